"""Prompts refused from their size in bytes, before tokenizing: the bound must be sound (never
refuse a prompt that fits), and off for a tokenizer it does not hold for."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import BadRequest
from app.processor import Processor
from config import load_settings
from conftest import ROOT

LIMIT = 64  # a small context, so texts around the threshold stay small


@pytest.fixture(scope="module")
def processor(model_path) -> Processor:
    return Processor(load_settings(ROOT / "configs" / "agg.yaml", [f"engine.max_model_len={LIMIT}"], environ={}))


def test_longest_token_is_measured_from_the_vocabulary(processor):
    longest = max(len(t.encode()) for t in processor.tokenizer.get_vocab())
    assert processor.max_token_bytes == longest


def _refused(processor, text: str, requested: int | None) -> bool:
    try:
        processor._check_size(text, "prompt", requested)
    except BadRequest as e:
        assert e.code == "context_length_exceeded" and e.param == "prompt"
        return True
    return False


def test_a_text_far_over_the_context_is_refused(processor):
    assert _refused(processor, "x" * (LIMIT * processor.max_token_bytes), None)
    assert not _refused(processor, "x" * 10, None)
    # With the output budget counted too.
    assert _refused(processor, "x" * ((LIMIT - 8) * processor.max_token_bytes), 16)


pieces = st.sampled_from(["the ", "x", " ", "\n", "\u00e9", "\u4e2d", "\U0001f642", "<|begin_of_text|>",
                          "<|start_header_id|>", "conversation", "\uff21", "e\u0301", "\x01"])
texts = st.one_of(st.text(max_size=3000), st.lists(pieces, max_size=400).map("".join),
                  st.tuples(pieces, st.integers(1, 200)).map(lambda t: t[0] * t[1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(text=texts, requested=st.one_of(st.none(), st.integers(1, LIMIT)))
def test_the_bound_never_refuses_a_prompt_that_fits(processor, text, requested):
    if _refused(processor, text, requested):
        tokens = len(processor.tokenizer.encode(text, add_special_tokens=True))
        assert tokens >= LIMIT or (requested is not None and tokens + requested > LIMIT), (tokens, text[:80])


def _tokenizer_with(normalizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if normalizer is not None:
        backend.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_no_bound_for_a_tokenizer_that_folds_or_fuses_text():
    from tokenizers import normalizers

    # Word-level: a whole word of unknown characters is one [UNK] token, and a space is none.
    for normalizer in (None, normalizers.NFKC()):
        processor = Processor.__new__(Processor)
        processor.tokenizer, processor.model_name = _tokenizer_with(normalizer), "folding"
        assert processor._max_token_bytes() is None
