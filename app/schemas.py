"""OpenAI request bodies, validated with pydantic. Ranges follow OpenAI's and vLLM's."""

from __future__ import annotations

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


Text = Annotated[str, AfterValidator(_utf8)]
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


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


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


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.tools:
            raise ValueError("tools are not supported by this deployment")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("only response_format type 'text' is supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
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
        raise BadRequest(f"{'.'.join(loc)}: {message}" if loc else message,
                         param=loc[0] if loc else None) from None


def _quotable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_type_tag(part: str | int) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))
