"""OpenAI request bodies, validated with pydantic. Ranges follow OpenAI's and vLLM's."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from app.errors import BadRequest

# Every integer is bounded here, so none reaches the engine out of the range its tensors and
# its torch.Generator take (an int of 2**64 or more made the worker fail with OverflowError).
# Counts and token ids fit vLLM's int32 tensors; a seed is a torch.long, the bound vLLM's own
# server applies (torch.Generator.manual_seed takes no more than 64 bits).
INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# OpenAI's own limits on logit_bias: at most 300 entries, each bias in [-100, 100].
MAX_LOGIT_BIAS_ENTRIES = 300


def _utf8(text: str) -> str:
    # JSON may spell a lone UTF-16 surrogate ("\ud800"), which Python keeps in a str but which
    # has no UTF-8 form: the tokenizer (and any log line or error message quoting it) fails on it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text: it contains a lone UTF-16 surrogate at "
                         f"character {e.start}") from None
    return text


class FieldError(ValueError):
    """A model validator's error about one field: the 400 names it in ``param``."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _json_text(value: dict) -> dict:
    # A schema travels on as JSON text (the task message, the chat template, the grammar
    # compilers), so it must have one: no lone surrogate in any key or string, no NaN or Infinity.
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text: it contains a lone UTF-16 surrogate at character "
                         f"{e.start} of its JSON") from None
    except ValueError:
        raise ValueError("must be JSON without NaN or Infinity") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
JsonObject = Annotated[dict, AfterValidator(_json_text)]
StopText = Annotated[Text, Field(min_length=1)]
PositiveInt = Annotated[int, Field(ge=1, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI and vLLM do. Fields whose meaning we cannot honour
    # are refused in `_refuse_unsupported`.
    # Strict: a field takes only its own JSON type, so "max_tokens": "5", "temperature": "0.5",
    # "top_k": 2.0 or "stream": "yes" are 400s, as with OpenAI, not quietly converted. Float
    # fields still take integers ("temperature": 1), which strict mode allows and OpenAI does too.
    # Floats must be finite: Python's JSON parser takes NaN and Infinity, which no range excludes.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ToolCallFunction(_Body):
    name: Annotated[Text, Field(min_length=1)]
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: Text
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    # An assistant's earlier calls, and a tool message's answer to one of them.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self


# -- structured outputs and tools: one set of types for chat, completions and (translated into a
# chat request) the Responses API. app/structured.py turns them into the engine's constraint.


class JsonSchemaFormat(_Body):
    name: Annotated[Text, Field(min_length=1, max_length=64)]
    description: Text | None = None
    # "schema" is a BaseModel attribute, hence the alias.
    json_schema: JsonObject = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs json_schema")
        return self


class StructuredOutputs(_Body):
    """vLLM's own extra, as its server names it: exactly one constraint. Options of vLLM's we do not
    pass on (whitespace_pattern, structural_tag, ...) are refused, not ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    json_: JsonObject | Annotated[Text, Field(min_length=1)] | None = Field(None, alias="json")
    json_object: Literal[True] | None = None
    regex: Text | None = None
    choice: Annotated[list[Text], Field(min_length=1, max_length=1024)] | None = None
    grammar: Annotated[Text, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in ("json", "json_object", "regex", "choice", "grammar")
                 if getattr(self, "json_" if name == "json" else name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, json_object, regex, choice or grammar, not {given or 'none'}")
        return self


class FunctionDefinition(_Body):
    name: Annotated[Text, Field(min_length=1, max_length=64)]
    description: Text | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: Annotated[Text, Field(min_length=1)]


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


# OpenAI's limits on metadata: at most 16 pairs, keys of at most 64 characters, values of 512.
Metadata = Annotated[dict[Annotated[Text, Field(max_length=64)], Annotated[Text, Field(max_length=512)]],
                     Field(max_length=16)]


class _Sampling(_Body):
    model: Text
    # Accepted and type-checked, then not acted on: OpenAI uses them for abuse tracking and
    # stored completions, neither of which this deployment has.
    user: Text | None = None
    metadata: Metadata | None = None
    max_tokens: PositiveInt | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    # vLLM refuses an empty stop string.
    stop: StopText | Annotated[list[StopText], Field(max_length=16)] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    # Token id (a string of digits, as OpenAI sends it) -> bias added to its logit. The ids are
    # checked against the vocabulary in app/processor.py, which knows it.
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS_ENTRIES,
                                json_schema_extra={"propertyNames": {"pattern": "^[0-9]{1,10}$"}})] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @property
    def constrains_output(self) -> bool:
        return self.structured_outputs is not None or (
            self.response_format is not None and self.response_format.type != "text")

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            # Digits only: int() would also take " 7", "+7", "7_0" and "٧" (an Arabic-Indic 7).
            if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= INT32_MAX):
                raise ValueError(f"keys must be token ids (strings of digits), got {key[:32]!r}")
        return bias

    @property
    def token_logit_bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _one_constraint(self):
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise FieldError("structured_outputs", "give response_format or structured_outputs, not both")
        return self


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(min_length=1, max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        """What OpenAI does without tool_choice: "auto" with tools, "none" without."""
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"

    @property
    def forced_tool(self) -> FunctionDefinition | None:
        """The one function a named tool_choice calls."""
        choice = self.effective_tool_choice
        if not isinstance(choice, NamedToolChoice):
            return None
        return next(t.function for t in self.tools or [] if t.function.name == choice.function.name)

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in tools or []]
        if len(set(names)) != len(names):
            raise ValueError("function names must be distinct")
        return tools

    @model_validator(mode="after")
    def _tool_choice_fits_tools(self):
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise FieldError("tool_choice", "tool_choice other than 'none' needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                t.function.name for t in self.tools or []}:
            raise FieldError("tool_choice",
                             f"tool_choice names function {choice.function.name!r}, which is not in tools")
        if self.constrains_output and (choice == "required" or isinstance(choice, NamedToolChoice)):
            # Both would constrain the same output, as vLLM's server also refuses.
            raise FieldError("tool_choice", "a required or named tool_choice cannot be combined with response_format "
                             "or structured_outputs")
        return self

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tool_history_is_paired(self):
        # A tool message answers a call an earlier assistant message made; a chat template cannot
        # render one out of nowhere, and OpenAI refuses it.
        called: set[str] = set()
        for m in self.messages:
            called.update(c.id for c in m.tool_calls or [])
            if m.role == "tool" and m.tool_call_id not in called:
                raise FieldError("messages", f"the tool message for {m.tool_call_id!r} answers no earlier "
                                             "assistant tool_calls")
        return self


class CompletionRequest(_Sampling):
    prompt: (Text | TokenIds | Annotated[list[Text], Field(min_length=1)]
             | Annotated[list[TokenIds], Field(min_length=1)])
    # 0 only with echo: the prompt's own logprobs, nothing generated (as vLLM's server allows).
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    # The prompt's text before each choice's; with logprobs, the prompt tokens' logprobs too.
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None

    @property
    def echo_only(self) -> bool:
        return self.echo and self.max_tokens == 0

    @property
    def requested_max_tokens(self) -> int | None:
        if self.echo_only:
            # The engine generates at least one token; the frontend drops it.
            return 1
        # OpenAI's legacy completions default to 16 tokens.
        return self.max_tokens if self.max_tokens is not None else 16

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens may be 0 only with echo")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of other than n is not supported")
        return self


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a completion ``prompt`` or chat ``messages`` (exactly one of them)."""

    # Exactly one input, and not both of the template's options (vLLM's rule): the document
    # says so too, so that a fuzz drawing from it sends mostly bodies this model takes.
    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
        "not": {"required": ["add_generation_prompt", "continue_final_message"],
                "properties": {"add_generation_prompt": {"const": True}, "continue_final_message": {"const": True}}},
    })

    model: Text | None = None
    prompt: Text | SkipJsonSchema[None] = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | SkipJsonSchema[None] = None
    # Defaults as vLLM's: special tokens (BOS) for a prompt; for messages the template writes
    # them. The generation prompt is added unless the last message is continued.
    add_special_tokens: bool | SkipJsonSchema[None] = None
    add_generation_prompt: bool | SkipJsonSchema[None] = None
    continue_final_message: bool = False
    return_token_strs: bool = False

    @property
    def generation_prompt(self) -> bool:
        return not self.continue_final_message if self.add_generation_prompt is None else self.add_generation_prompt

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        return self


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[TokenId]


def parse(model: type[_Body], body: object) -> _Body:
    """Validates a JSON body; the first problem becomes a 400 naming the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        # A field of several types (prompt, content, stop) fails once per type; the error that
        # went deepest, and then one about a value rather than a type, is from the type the
        # client meant (a list of strings, one of them bad).
        first = max(errors, key=lambda err: (len(err["loc"]), not err["type"].endswith("_type")))
        # Locations name those types too ("function-after[_utf8(), str]", "list[int]"): dropped.
        # A location may hold a client's dict key (logit_bias), which may be long or hold a lone
        # surrogate: the message quotes at most 64 characters of it, escaped.
        loc = [_quotable(str(p)[:64]) for p in first["loc"] if not _is_type_tag(p)]
        message = _quotable(first["msg"].removeprefix("Value error, "))
        cause = first.get("ctx", {}).get("error")
        if not loc and isinstance(cause, FieldError):
            raise BadRequest(message, param=cause.param) from None
        raise BadRequest(f"{'.'.join(loc)}: {message}" if loc else message,
                         param=loc[0] if loc else None) from None


def _quotable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_type_tag(part: str | int) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))
