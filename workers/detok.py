"""A streaming detokenizer that can start where another one stopped: a resumed request's prompt
ends with the tokens its client already has, and may end in the middle of a character.

vLLM detokenizes each request with ``tokenizers``' ``DecodeStream``, primed with the prompt. When
the primed text ends in an unfinished UTF-8 sequence (U+FFFD), that ``DecodeStream`` keeps no
prefix, and its first step returns the text of the whole prompt: a migrated stream whose move
split a character (or a run of bytes that is not valid UTF-8) would repeat the prompt and every
token already sent. This one primes on the prompt up to its last clean character boundary and
steps through the rest, so the unfinished bytes wait in its window exactly as they waited in the
stream that produced them, and come out with the tokens that follow.

vLLM looks ``DecodeStream`` up on ``tokenizers.decoders`` for every request so that a backend can
replace it (vllm/v1/engine/detokenizer.py); ``install`` does that in a decode worker's process,
where the engine's output processor detokenizes.
"""

from __future__ import annotations

from typing import Any

import tokenizers.decoders

# How far back from the end of a prompt an unfinished character is looked for. A UTF-8
# character has at most 4 bytes and each token at least one; longer runs are bytes that form no
# character at all, and past this many they are stepped through from an empty stream instead.
MAX_PENDING_TOKENS = 32
# Tokens decoded to see how a prefix of the prompt ends: enough for any character's bytes.
TAIL_WINDOW = 8
REPLACEMENT = "\ufffd"


def clean_cut(decode, ids: list[int], max_pending: int = MAX_PENDING_TOKENS) -> int:
    """The largest n such that ``ids[:n]`` decodes to text that does not end in U+FFFD, looking
    at most ``max_pending`` tokens back; 0 if there is none that close (or ids is empty)."""
    floor = max(0, len(ids) - max_pending)
    cut = len(ids)
    while cut > floor:
        if not decode(ids[max(0, cut - TAIL_WINDOW):cut]).endswith(REPLACEMENT):
            return cut
        cut -= 1
    return 0 if floor == 0 else -1


class ResumableDecodeStream:
    """``tokenizers.decoders.DecodeStream`` with priming that holds an unfinished character back.
    The tokenizer arrives only with the first step, so priming waits for it."""

    native: Any = tokenizers.decoders.DecodeStream  # the class it wraps (install() keeps a backend's)

    def __init__(self, ids: list[int] | None = None, skip_special_tokens: bool = False):
        self._skip = skip_special_tokens
        self._prompt = list(ids) if ids else []
        self._stream = None if self._prompt else self.native(skip_special_tokens=skip_special_tokens)

    def step(self, tokenizer, token_id: int) -> str | None:
        if self._stream is None:
            self._stream = self._primed(tokenizer)
        return self._stream.step(tokenizer, token_id)

    def _primed(self, tokenizer):
        ids = self._prompt
        cut = clean_cut(lambda part: tokenizer.decode(part, skip_special_tokens=self._skip), ids)
        if cut < 0:  # a long run of bytes that form no character: step through its last part only
            cut, start = 0, len(ids) - MAX_PENDING_TOKENS
        else:
            start = cut
        stream = self.native(ids=ids[:cut], skip_special_tokens=self._skip) if cut else \
            self.native(skip_special_tokens=self._skip)
        for token_id in ids[start:]:
            stream.step(tokenizer, token_id)  # unfinished: held back, as when it was generated
        return stream


def install() -> None:
    """Makes vLLM's detokenizer use ResumableDecodeStream in this process. Idempotent."""
    current = tokenizers.decoders.DecodeStream
    if current is not ResumableDecodeStream:
        ResumableDecodeStream.native = current
        setattr(tokenizers.decoders, "DecodeStream", ResumableDecodeStream)  # noqa: B010  (typed as the native class)
