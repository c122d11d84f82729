"""Tool calls out of a chat choice's text: OpenAI's ``tool_calls``, whole or as stream deltas.

A named function or ``required`` constrained the text to JSON (app/structured.py), which is read
here as vLLM's server reads it: a named function's arguments, or a list of ``{"name",
"parameters"}`` calls. ``auto`` leaves the text free, and the model's own call syntax is parsed by
vLLM's tool parser for the model (``model.tool_call_parser``: hermes, llama3_json, ...). Those
parsers are the one part of vLLM the frontend loads, and only when configured.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

from app.schemas import ChatCompletionRequest

logger = logging.getLogger(__name__)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, arguments: str) -> dict:
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def load_parser(name: str) -> type:
    """vLLM's tool parser class of that name (its --tool-call-parser names). Imports vLLM."""
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        raise ValueError(f"model.tool_call_parser: vLLM has no tool parser {name!r}; it has "
                         f"{', '.join(sorted(ToolParserManager.list_registered()))}") from None


class ChoiceTools:
    """One choice's tool calls. ``message`` reads a whole text; ``delta`` and ``finish`` read a
    stream of it and return the chunks' ``delta`` objects (None: nothing to send yet)."""

    def __init__(self, req: ChatCompletionRequest, make_parser: Callable[[], Any] | None):
        choice = req.effective_tool_choice
        self.forced = req.forced_tool
        self.mode = "named" if self.forced is not None else str(choice)
        self._parser = make_parser() if self.mode == "auto" and make_parser is not None else None
        self._vllm_request = vllm_request(req) if self._parser is not None else None
        self._text = ""
        self._token_ids: list[int] = []
        self._named_id: str | None = None
        self._scanned = 0  # required: how far the text was read into closed calls
        self._num_calls = 0
        self.called = False

    # -- whole responses -------------------------------------------------------------------

    def message(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) for a finished text."""
        if self.mode == "named":
            assert self.forced is not None
            return None, [_call(self.forced.name, text)]
        if self.mode == "required":
            calls = _required_calls(text)
            return (None, calls) if calls is not None else (text, [])
        if self._parser is not None:
            try:
                info = self._parser.extract_tool_calls(text, self._vllm_request)
            except Exception:  # noqa: BLE001  text the parser chokes on is still the model's answer
                logger.warning("the %s tool parser failed on a whole answer; returned as content",
                               type(self._parser).__name__, exc_info=True)
                return text, []
            if info.tools_called:
                calls = [_call(c.function.name, c.function.arguments) for c in info.tool_calls]
                return info.content or None, calls
        return text, []

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """OpenAI's: "tool_calls" when auto or required made calls and the model stopped; a named
        function's call ends with "stop"."""
        if called and reason == "stop" and self.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    # -- streams ---------------------------------------------------------------------------

    def delta(self, text: str, token_ids: list[int]) -> dict | None:
        if self.mode == "named":
            assert self.forced is not None
            if self._named_id is None:
                self._named_id = call_id()
                self.called = True
                return {"tool_calls": [{"index": 0, "id": self._named_id, "type": "function",
                                        "function": {"name": self.forced.name, "arguments": text}}]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else None
        if self.mode == "required":
            # Each call goes out whole once its object in the list closes.
            self._text += text
            calls = self._closed_calls()
            return {"tool_calls": calls} if calls else None
        if self._parser is None:
            return {"content": text} if text else None
        previous, previous_ids = self._text, self._token_ids
        self._text, self._token_ids = previous + text, previous_ids + list(token_ids)
        try:
            out = self._parser.extract_tool_calls_streaming(previous, self._text, text, previous_ids,
                                                            self._token_ids, list(token_ids), self._vllm_request)
        except Exception:  # noqa: BLE001  as in message(): the text goes out as content, not as a failure
            logger.warning("the %s tool parser failed on a stream; the text goes out as content",
                           type(self._parser).__name__, exc_info=True)
            return {"content": text} if text else None
        if out is None:
            return None
        body = out.model_dump(exclude_none=True)
        body.pop("role", None)
        if body.get("tool_calls"):
            self.called = True
            for call in body["tool_calls"]:
                if "id" in call and "type" not in call:
                    call["type"] = "function"
        return body or None

    def finish(self) -> dict | None:
        """The last delta before the finish reason: what a cut-off ``required`` answer wrote, or the
        arguments an auto parser had not streamed yet."""
        if self.mode == "required":
            calls = self._closed_calls()
            if calls:
                return {"tool_calls": calls}
            # Cut off (max_tokens) before any call closed: what came is the answer's content.
            return {"content": self._text} if self._text and not self.called else None
        if self._parser is not None and self.called:
            rest = self._parser.get_remaining_unstreamed_args()
            if rest:
                index = len(self._parser.prev_tool_call_arr) - 1
                return {"tool_calls": [{"index": index, "function": {"arguments": rest}}]}
        return None


    def _closed_calls(self) -> list[dict]:
        """The ``required`` calls whose objects closed since the last look, as stream deltas.
        The grammar makes the text a JSON list of objects, so each closes where raw_decode ends."""
        calls: list[dict] = []
        while True:
            start = len(self._text) - len(self._text[self._scanned:].lstrip(" \t\n\r[,"))
            try:
                item, end = _decoder.raw_decode(self._text, start)
                call = _call(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
            except (ValueError, TypeError, KeyError):
                return calls
            calls.append({"index": self._num_calls, **call})
            self._num_calls += 1
            self._scanned = end
            self.called = True


_decoder = json.JSONDecoder()


def _required_calls(text: str) -> list[dict] | None:
    """The calls in a ``required`` answer, or None if it is not one (cut off by max_tokens)."""
    try:
        items = json.loads(text)
        return [_call(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items]
    except (ValueError, TypeError, KeyError):
        return None


def vllm_request(req: ChatCompletionRequest):
    """vLLM's form of the request, which its tool parsers read (the tools, the tool_choice)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

    return VllmChatRequest.model_validate({
        "model": req.model, "messages": [],
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "tool_choice": "auto"})
