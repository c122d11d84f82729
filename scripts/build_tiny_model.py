"""Build the project's default tiny Llama model into a local folder, deterministically.

Why this exists: no machine here reaches a model hub, so nothing can be downloaded. This builds
a small Llama (4 layers, hidden 256, ~1.6k vocab, bf16, ~6 MB) from nothing: a byte-level BPE
tokenizer trained on a built-in English corpus, a Llama-3-style chat template and seeded random
weights. Random weights generate gibberish, but vLLM loads, tokenizes, batches and serves the
model through the same code paths as a real one.

`--size bench` builds a bigger model with the same tokenizer (hidden 512, 4 layers, 8 heads) into
`bench-llama`, for the benchmarks of routing and disaggregation: there a 2,048-token prefill must
cost what a real model's does relative to a decode step (at least 25 steps at batch 1), which the
tiny model's does not (docs/benchmarks.md, "The benchmark model"). Tests keep the tiny one.

Usage: python scripts/build_tiny_model.py [--size tiny|bench] [--out DIR] [--force]
The model path is the last line of stdout. Re-running on a complete folder built by this same
script is a fast no-op; a folder built by another version of it is rebuilt.
"""
import argparse
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
MARKER = ".complete"
BOS, EOS, SOH, EOH, EOT, PAD = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                "<|end_header_id|>", "<|eot_id|>", "<|pad|>")
# Llama 3.1's tool-call token: vLLM's llama3_json tool parser requires it in the vocabulary.
PYTHON_TAG = "<|python_tag|>"
# Llama-3.1-style: tools go into a system block as JSON, with the instruction to answer a call as
# {"name": ..., "parameters": ...} (what the llama3_json tool parser reads); an assistant's earlier
# calls are written the same way, and a tool's answer comes back as an "ipython" message.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'You have access to the following functions. To call one, respond only with JSON of the form '"
    " + '{\"name\": function name, \"parameters\": object of argument names and values}.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for call in message['tool_calls'] %}{%- if not loop.first %}{{- '; ' }}{%- endif %}"
    "{{- '{\"name\": ' + (call['function']['name'] | tojson) + ', \"parameters\": '"
    " + (call['function']['arguments'] | tojson) + '}' }}"
    "{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. "
    "Every morning he rowed out before sunrise, and every evening she waited for him on the shore.",
    "Hello! How are you today? I am fine, thank you. What would you like to talk about? "
    "Could you help me with a question, please? Of course, I would be happy to help.",
    "The server receives a request, places it in a queue, and a worker picks it up. "
    "When the model finishes generating tokens, the response is streamed back to the client.",
    "Water boils at 100 degrees Celsius at sea level. The Earth orbits the Sun once every 365 "
    "days, and the Moon takes about 27 days to orbit the Earth.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, 2))\n",
    "She said, \"Don't forget the keys!\" He replied, 'I won't.' They're leaving at 7:30 p.m. "
    "on Monday, March 3rd, and they'll be back by Friday.",
    "History teaches us that cities grow along rivers, roads and railways. Markets, schools, "
    "hospitals and libraries follow the people who settle there.",
    "In mathematics, a prime number is greater than one and has no divisors other than one and "
    "itself. Two, three, five, seven and eleven are the first few primes.",
    "Good morning, everyone. Today we will discuss the weather, the news, music, sports, science, "
    "cooking, travel and the art of writing short, clear sentences.",
    "System, user and assistant messages form a conversation. The assistant answers politely, "
    "briefly and accurately; if it does not know something, it says so.",
    "Autumn leaves drift across quiet gardens while children chase squirrels beneath enormous oak "
    "trees, laughing loudly until their grandmother calls everybody inside for warm pumpkin soup.",
    "Engineers measure latency, throughput and memory usage carefully before optimizing anything; "
    "premature optimization, as the famous saying goes, is the root of all evil.",
    "Bakers knead flour, yeast, salt and water into dough, then leave it overnight so that the "
    "bread develops flavour, structure and a beautifully crisp, golden crust.",
    "Musicians practise scales, rhythms and chords for years; a symphony orchestra combines "
    "violins, cellos, trumpets, flutes, clarinets and drums into one magnificent, surprising "
    "sound.",
]


# Named sizes: the Llama shape of each, and the folder it is built into. Heads are 64 wide in
# both, a size vLLM's CPU attention kernels take.
SIZES = {
    "tiny": {"folder": "tiny-llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "bench": {"folder": "bench-llama", "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2},
}


def default_out(size: str = "tiny") -> Path:
    base = os.environ.get("LLMQ_MODEL_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "llmq" / "models") / SIZES[size]["folder"]


def recipe() -> str:
    """What the marker holds: this script's own hash, so that any change to how the model is built
    (its template, tokens, corpus or weights) rebuilds a cached one."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def is_complete(path: Path) -> bool:
    if not all((path / name).is_file() for name in (*REQUIRED, MARKER)):
        return False
    return (path / MARKER).read_text().strip() == recipe()


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1600, min_frequency=1, show_progress=False,
                                  special_tokens=[BOS, EOS, SOH, EOH, EOT, PAD, PYTHON_TAG],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # The paragraphs as written, in upper case and in title case: more distinct words, same text.
    lines = CORPUS + [p.upper() for p in CORPUS] + [p.title() for p in CORPUS]
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(  # prepend BOS, as Llama 3 does
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                     pad_token=PAD, additional_special_tokens=[SOH, EOH, EOT, PYTHON_TAG],
                                     model_max_length=4096, clean_up_tokenization_spaces=False)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    return hf_tok


def build_model(out: Path, tok, size: str = "tiny") -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOS, EOS, EOT, PAD)}
    shape = {k: v for k, v in SIZES[size].items() if k != "folder"}
    config = LlamaConfig(
        vocab_size=len(tok), **shape, max_position_embeddings=4096,
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[EOT]], pad_token_id=ids[PAD],
        tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[EOT]], pad_token_id=ids[PAD])
    model.save_pretrained(out, safe_serialization=True)
    num_params = sum(p.numel() for p in model.parameters())
    log.info("model: vocab=%d params=%d", config.vocab_size, num_params)


def build(out: Path, force: bool = False, size: str = "tiny") -> Path:
    if is_complete(out) and not force:
        log.info("already built: %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        log.info("building tokenizer and model in %s", tmp)
        build_model(tmp, build_tokenizer(tmp), size)
        for f in tmp.iterdir():
            f.chmod(0o644)  # some files are written 0600; the cache is meant to be shared
        (tmp / MARKER).write_text(recipe() + "\n")  # written last: marks the folder as usable
        tmp.chmod(0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # --force or a half-built leftover: move it aside, then swap in
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # a concurrent builder got there first; its model is just as good
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(out):
            raise
    log.info("built %s", out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="named model size")
    parser.add_argument("--out", type=Path, help="model folder (default: the size's folder in the model cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = args.out or default_out(args.size)
    print(build(out.expanduser().resolve(), args.force, args.size))


if __name__ == "__main__":
    main()
