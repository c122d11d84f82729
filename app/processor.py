"""The "processor" role of Dynamo's examples: chat template, tokenization, and the limits a prompt must meet.

It turns a validated OpenAI body into token ids and a SamplingSpec; the engine never sees text.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any, cast

from app import metrics
from app.errors import BadRequest
from app.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, TokenizeRequest
from app.structured import constraint_for
from app.tools import ChoiceTools, load_parser
from config import Settings
from tasks.messages import SamplingSpec

logger = logging.getLogger(__name__)


class Processor:
    def __init__(self, settings: Settings):
        from transformers import AutoTokenizer

        self.model_name = settings.model.name
        self.max_model_len = settings.engine.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model.resolved_path)
        self.vocab_size = len(self.tokenizer)
        self.max_token_bytes = self._max_token_bytes()
        if not self.tokenizer.chat_template:
            logger.warning("model %s has no chat template; /v1/chat/completions will refuse requests",
                           settings.model.resolved_path)
        # vLLM's tool parser for tool_choice "auto"; loading it imports vLLM, so only when configured.
        # Here, in gunicorn's master (preload_app), so the forked workers share it.
        self.tool_call_parser = settings.model.tool_call_parser
        self._parser_cls = load_parser(self.tool_call_parser) if self.tool_call_parser else None
        if self._parser_cls is not None:
            self._parser_cls(self.tokenizer)  # fails here, at start, if the tokenizer lacks its tokens

    def prepare(self) -> None:
        """Compiles the chat template (transformers caches the compiled form) and runs the
        tokenizer once, in gunicorn's master, so no request pays for either (app/gateway.py,
        *warm-up*)."""
        if self.tokenizer.chat_template:
            with contextlib.suppress(Exception):  # a template that rejects this is reported per request
                self.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                   add_generation_prompt=True)
        self.tokenizer.encode("warm up", add_special_tokens=False)

    def _max_token_bytes(self) -> int | None:
        """The most bytes of UTF-8 text one token stands for, or None if that cannot be relied on.

        A text of B bytes then has at least B / max_token_bytes tokens, so a prompt can be
        refused as too long from its size alone, before the tokenizer spends seconds of CPU on
        it. A token's own string, in UTF-8, is at least as long as the text it covers in the
        byte-level (GPT-2, Llama 3) and SentencePiece (U+2581 for a space, "<0x0A>" for a
        byte) vocabularies alike. A normalizer that folds text (NFKC turns a 3-byte full-width
        letter into a 1-byte one) or a tokenizer that drops or fuses characters would break
        that, so the bound must hold on the hardest texts below, or it is not used."""
        vocab = self.tokenizer.get_vocab()
        if not vocab:
            return None
        longest = max(len(token.encode("utf-8", "replace")) for token in vocab)
        probes = ["\uff21\uff22\uff23", "e\u0301", "\ufb01", "\x01", "\u200b", "\ufeff", "\U00020000", "\U0001f642",
                  " ", "\n", "\t", "the ", "a", "0", "<|endoftext|>", "\u00e9", "\u4e2d"]
        for probe in probes:
            text = probe * 64
            if len(self.tokenizer.encode(text, add_special_tokens=False)) * longest < len(text.encode()):
                logger.warning("tokenizer of %s folds or drops text (%r): prompts are measured only "
                               "by tokenizing them", self.model_name, probe)
                return None
        return longest

    def _check_size(self, text: str, param: str, requested: int | None) -> None:
        """Refuses a text whose size in bytes already proves it too long for the context."""
        if self.max_token_bytes is None:
            return
        at_least = -(-len(text.encode("utf-8")) // self.max_token_bytes)
        if at_least >= self.max_model_len or (requested is not None and at_least + requested > self.max_model_len):
            metrics.PROMPTS_REFUSED_BY_SIZE.inc()
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; your prompt has at "
                f"least {at_least} tokens ({len(text.encode('utf-8'))} bytes). Shorten the prompt.",
                param=param, code="context_length_exceeded")

    # -- prompts ---------------------------------------------------------------------------

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        # The tools go to the template whatever tool_choice says, as vLLM's server does: "none"
        # means no call now, not that the model never heard of them.
        tools: list[dict | Callable] | None = (
            [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools] if req.tools else None)
        text = self._render(req.messages, "use /v1/completions", tools=tools, add_generation_prompt=True)
        # Measured after the template, which may trim or drop parts of the messages; rendering
        # is cheap next to tokenizing.
        self._check_size(text, "messages", req.requested_max_tokens)
        # The template already wrote the special tokens it wants.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _render(self, messages: list[ChatMessage], instead: str, **template_options: Any) -> str:
        """The messages through the model's chat template, as text; a template error is the caller's."""
        if not self.tokenizer.chat_template:
            raise BadRequest(f"this model has no chat template; {instead}", param="messages")
        try:
            return cast(str, self.tokenizer.apply_chat_template(
                [_template_message(m) for m in messages], tokenize=False, **template_options))
        except Exception as e:  # noqa: BLE001  template errors (e.g. role order) are the caller's
            raise BadRequest(f"the chat template rejected these messages: {e}", param="messages") from e

    def tools_for(self, req: ChatCompletionRequest) -> Callable[[], ChoiceTools] | None:
        """Makes each choice's reader of tool calls, or None when the request cannot call one."""
        choice = req.effective_tool_choice
        if choice == "none":
            return None
        if choice == "auto" and self._parser_cls is None:
            raise BadRequest('tool_choice "auto" (the default with tools) needs a tool parser for this model, and '
                             "this deployment has none (model.tool_call_parser); use \"required\" or a named "
                             "function, which work on any model", param="tool_choice")
        parser_cls, tokenizer = self._parser_cls, self.tokenizer
        make_parser = (lambda: parser_cls(tokenizer)) if parser_cls is not None else None
        return lambda: ChoiceTools(req, make_parser)

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            return [self._encode(prompt, req.requested_max_tokens)]
        if all(isinstance(p, int) for p in prompt):
            return [self._check_ids(cast(list[int], prompt))]
        if all(isinstance(p, str) for p in prompt):
            texts = cast(list[str], prompt)
            for text in texts:  # all of them before any is tokenized
                self._check_size(text, "prompt", req.requested_max_tokens)
            return [self._encode(text, req.requested_max_tokens) for text in texts]
        return [self._check_ids(cast(list[int], p)) for p in prompt]

    def _encode(self, text: str, requested: int | None) -> list[int]:
        self._check_size(text, "prompt", requested)
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        return ids

    def _check_ids(self, ids: list[int]) -> list[int]:
        self._check_vocab(ids, "prompt")
        return list(ids)

    # -- limits and sampling ---------------------------------------------------------------

    def max_tokens_for(self, prompt_ids: list[int], requested: int | None) -> int:
        """The output budget; refuses prompts that leave no room in the context."""
        prompt_len, limit = len(prompt_ids), self.max_model_len
        if prompt_len >= limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens; your prompt has "
                f"{prompt_len} tokens. Shorten the prompt.", param="messages", code="context_length_exceeded")
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens; you asked for {prompt_len} "
                f"prompt tokens plus {requested} completion tokens. Lower max_tokens or shorten the prompt.",
                param="max_tokens", code="context_length_exceeded")
        return requested

    def _check_vocab(self, ids, param: str) -> None:
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise BadRequest(f"token id {bad[0]} is out of range; the vocabulary has {self.vocab_size} tokens",
                             param=param)

    def sampling(self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingSpec:
        self._check_vocab(req.stop_token_ids or [], "stop_token_ids")
        logit_bias = req.token_logit_bias
        self._check_vocab(logit_bias, "logit_bias")
        # A top_k of the vocabulary or more keeps every token: the same as none, which is also
        # what the engine makes of it.
        top_k = req.top_k if req.top_k is not None and 0 < req.top_k < self.vocab_size else 0
        return SamplingSpec(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=top_k,
            min_tokens=min(req.min_tokens, max_tokens),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            stop=req.stop_list,
            stop_token_ids=list(req.stop_token_ids or []),
            seed=req.seed,
            n=req.n,
            ignore_eos=req.ignore_eos,
            logprobs=req.num_logprobs,
            logit_bias=sorted(logit_bias.items()),
            structured=constraint_for(req),
            prompt_logprobs=req.num_prompt_logprobs if isinstance(req, CompletionRequest) else None,
        )

    # -- echo, /tokenize, /detokenize -------------------------------------------------------

    def echo_texts(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """Each prompt's text, as echo returns it: as given, or decoded from its token ids."""
        if isinstance(req.prompt, str):
            return [req.prompt]
        if all(isinstance(p, str) for p in req.prompt):
            return cast(list[str], list(req.prompt))
        return [cast(str, self.tokenizer.decode(ids)) for ids in prompts]

    def token_text(self, token_id: int) -> str:
        return cast(str, self.tokenizer.decode([token_id]))

    def tokenize(self, req: TokenizeRequest) -> list[int]:
        if req.prompt is not None:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            self._check_size(req.prompt, "prompt", None)
            return self.tokenizer.encode(req.prompt, add_special_tokens=add_special)
        text = self._render(req.messages or [], "tokenize a prompt instead",
                            add_generation_prompt=req.generation_prompt,
                            continue_final_message=req.continue_final_message)
        self._check_size(text, "messages", None)
        return self.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))

    def token_strings(self, ids: list[int]) -> list[str]:
        return cast(list[str], self.tokenizer.convert_ids_to_tokens(ids))

    def detokenize(self, ids: list[int]) -> str:
        self._check_vocab(ids, "tokens")
        return cast(str, self.tokenizer.decode(ids))


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (transformers' convention): a call's arguments as an
    object, which Llama 3.1-style templates write out with tojson."""
    out: dict[str, Any] = {"role": m.role, "content": m.text}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for call in m.tool_calls:
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                raise BadRequest(f"the arguments of tool call {call.id!r} are not valid JSON",
                                 param="messages") from None
            calls.append({"id": call.id, "type": "function",
                          "function": {"name": call.function.name, "arguments": arguments}})
        out["tool_calls"] = calls
    return out
