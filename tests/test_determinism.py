"""With temperature 0, the HTTP stack returns exactly what the engine returns when called directly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from config import dump_settings
from conftest import ROOT

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the long-forgotten city of Aeloria."}]


def test_http_matches_direct_engine(deployment, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(deployment.settings.model.resolved_path)
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False)
    text_prompt = "Once a beacon of knowledge and power"
    text_ids = tokenizer.encode(text_prompt)

    cfg = tmp_path / "engine.yaml"
    dump_settings(deployment.settings, cfg)
    jobs = [{"prompt_token_ids": chat_ids, "max_tokens": 24}, {"prompt_token_ids": text_ids, "max_tokens": 24}]
    proc = subprocess.run([sys.executable, "-m", "tests.direct_engine", str(cfg)],
                          input=json.dumps(jobs), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    direct_chat, direct_text = json.loads(line.removeprefix("RESULT "))

    client = deployment.client()
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                          logprobs=True, extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens == len(chat_ids)
    assert chat.choices[0].message.content == direct_chat["text"]
    assert [t.logprob for t in chat.choices[0].logprobs.content] == pytest.approx(direct_chat["logprobs"], abs=1e-3)

    completion = client.completions.create(model=MODEL, prompt=text_prompt, max_tokens=24, temperature=0,
                                           logprobs=0, extra_body={"ignore_eos": True})
    assert completion.usage.prompt_tokens == len(text_ids)
    assert completion.choices[0].text == direct_text["text"]
    assert completion.choices[0].logprobs.token_logprobs == pytest.approx(direct_text["logprobs"], abs=1e-3)
    assert completion.usage.completion_tokens == len(direct_text["token_ids"]) == 24
