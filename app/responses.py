"""OpenAI response bodies and stream chunks, built from the workers' Delta events."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from app.tools import ChoiceTools
from tasks.messages import Delta, TokenLogprob

# Encodes every stream's chunk, once a token: msgspec takes about a tenth of json.dumps's CPU.
_JSON = msgspec.json.Encoder()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def body(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class Choice:
    """One choice's text, accumulated for a non-streaming response."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _chat_logprobs(items: list[TokenLogprob]) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [
        {**entry(lp.token, lp.logprob or 0.0), "top_logprobs": [entry(t.token, t.logprob) for t in lp.top]}
        for lp in items
    ]}


def _completion_logprobs(items: list[TokenLogprob], text_offset: int) -> dict:
    offsets = []
    for lp in items:
        offsets.append(text_offset)
        text_offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        # None where the token has no logprob: an echoed prompt's first token, as vLLM's server has it.
        "top_logprobs": [None if lp.logprob is None else {t.token: t.logprob for t in lp.top} for lp in items],
        "text_offset": offsets,
    }


class Formatter:
    """Shapes one request's output, as /v1/chat/completions or /v1/completions wants it."""

    def __init__(self, kind: str, request_id: str, model: str, want_logprobs: bool,
                 tools: Callable[[], ChoiceTools] | None = None):
        self.chat = kind == "chat"
        self.id = f"chatcmpl-{request_id}" if self.chat else f"cmpl-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.want_logprobs = want_logprobs
        self._text_offsets: dict[int, int] = {}
        # Each choice's reader of tool calls, when the request can call tools (app/tools.py).
        self._make_tools = tools
        self._tools: dict[int, ChoiceTools] = {}

    def _choice_tools(self, index: int) -> ChoiceTools | None:
        if self._make_tools is None:
            return None
        if index not in self._tools:
            self._tools[index] = self._make_tools()
        return self._tools[index]

    # -- streaming -------------------------------------------------------------------------

    # Chunks are bodies (dicts); ``sse`` frames one for the wire. /v1/responses reads the same
    # bodies and re-shapes them into its own events (app/responses_api.py).

    def _chunk(self, choices: list[dict], usage: Usage | None, include_usage: bool) -> dict:
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            body["usage"] = usage.body() if usage else None
        return body

    @staticmethod
    def sse(body: dict) -> bytes:
        # Bytes, which the WSGI server writes as they are. UTF-8 as it is (as json.dumps with
        # ensure_ascii=False), no spaces after separators, and a NaN or infinity as null: valid JSON.
        return b"data: " + _JSON.encode(body) + b"\n\n"

    def role_chunk(self, index: int, include_usage: bool) -> dict:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}], None, include_usage)

    def delta_chunk(self, index: int, delta: Delta, include_usage: bool) -> list[dict]:
        """The chunks for one delta: usually one, none while tool calls are held back, and two
        when held-back calls go out with the finish reason."""
        choice: dict = {"index": index, "finish_reason": delta.finish_reason}
        choice["logprobs"] = self._logprobs(index, delta.logprobs) if self.want_logprobs and delta.logprobs else None
        tools = self._choice_tools(index) if self.chat else None
        if tools is not None:
            return self._tool_chunks(tools, choice, delta, include_usage)
        if self.chat:
            choice["delta"] = {"content": delta.text} if delta.text or not delta.finish_reason else {}
        else:
            choice["text"] = delta.text
        return [self._chunk([choice], None, include_usage)]

    def _tool_chunks(self, tools: ChoiceTools, choice: dict, delta: Delta, include_usage: bool) -> list[dict]:
        bodies = []
        if delta.text or delta.token_ids:
            bodies.append(tools.delta(delta.text, delta.token_ids))
        if delta.finish_reason:
            bodies.append(tools.finish())
            choice["finish_reason"] = tools.finish_reason(delta.finish_reason, tools.called)
        bodies = [b for b in bodies if b]
        if not bodies:
            if not delta.finish_reason and choice["logprobs"] is None:
                return []
            bodies = [{}]
        last = len(bodies) - 1
        return [self._chunk([{**choice, "delta": body, "logprobs": choice["logprobs"] if i == 0 else None,
                              "finish_reason": choice["finish_reason"] if i == last else None}],
                            None, include_usage)
                for i, body in enumerate(bodies)]

    def usage_chunk(self, usage: Usage) -> dict:
        return self._chunk([], usage, True)

    @staticmethod
    def error_chunk(body: dict) -> bytes:
        return b"data: " + _JSON.encode(body) + b"\n\n"

    DONE = b"data: [DONE]\n\n"

    # -- whole responses -------------------------------------------------------------------

    def response(self, choices: dict[int, Choice], usage: Usage) -> dict:
        out = []
        for index in sorted(choices):
            c = choices[index]
            logprobs = self._logprobs(index, c.logprobs) if self.want_logprobs else None
            tools = self._choice_tools(index) if self.chat else None
            if tools is not None:
                content, calls = tools.message(c.text)
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                out.append({"index": index, "message": message, "logprobs": logprobs,
                            "finish_reason": tools.finish_reason(c.finish_reason, bool(calls))})
            elif self.chat:
                out.append({"index": index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
            else:
                out.append({"index": index, "text": c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": out, "usage": usage.body()}

    def _logprobs(self, index: int, items: list[TokenLogprob] | None) -> dict:
        items = items or []
        if self.chat:
            return _chat_logprobs(items)
        offset = self._text_offsets.get(index, 0)
        self._text_offsets[index] = offset + sum(len(lp.token) for lp in items)
        return _completion_logprobs(items, offset)
