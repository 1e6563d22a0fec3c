"""Request and response bodies of OpenAI's completions API, as pydantic models.

Requests are strict (no "5" for 5, no unknown fields: OpenAI rejects both too). The sampling
controls that `SampleConfig` also has (temperature, top_p, top_k, stop, seed, on_unknown) take
their defaults and help text from it, and a request's controls are checked once, by building its
`SampleConfig` (`SampleConfig.validate` decides what is allowed, as for `chargpt sample`).
`CompletionRequest.job` turns a valid request into the engine's `Job`, within the vocabulary and
the server's limits.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from chargpt.config import MAX_SEED, SampleConfig, ServeConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import OptionError
from chargpt.generation.generate import encode_prompt, sample_config
from chargpt.serve.jobs import Job
from chargpt.serve.limits import (
    check_echo,
    check_ids,
    check_known,
    check_prompt_length,
    check_size,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
MAX_STOP_STRINGS = 4  # as OpenAI
# OpenAI parameters a character model has no use for: accepted at their neutral value only, so
# that clients that always send them (LangChain, harnesses) work unchanged
NEUTRAL = {"best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
SAMPLE_FIELDS = {f.name: f for f in dataclasses.fields(SampleConfig)}
REQUEST_FIELDS = {"max_new_tokens": "max_tokens", "num_samples": "n"}  # SampleConfig's: OpenAI's


def sample_field(name: str, openai: str | None = None) -> Any:
    """An optional request field documented by SampleConfig's help text (null: its default)."""
    field = SAMPLE_FIELDS[name]
    default = f" (default: {openai or field.default})"
    return Field(None, description=field.metadata["help"] + default)


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Strict):
    include_usage: bool | None = Field(
        None, description="send a last chunk with the usage and no choices before [DONE]"
    )


class CompletionRequest(Strict):
    """POST /v1/completions. Lengths and counts are in characters (one token per character)."""

    model: str = Field(description="the run's name, as GET /v1/models lists it")
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text to continue, or a list of texts; or token ids (as /tokenize returns "
        "them), or a list of lists of them"
    )
    max_tokens: int | None = Field(
        None, ge=0, description=f"characters to generate per choice (default: {DEFAULT_MAX_TOKENS})"
    )
    temperature: float | None = sample_field("temperature")
    top_p: float | None = sample_field("top_p")
    n: int | None = Field(None, ge=1, le=128, description="choices per prompt (default: 1)")
    stop: str | list[str] | None = Field(
        None, description=f"up to {MAX_STOP_STRINGS} strings that end a choice (not returned)"
    )
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED)] | None = sample_field("seed", "random")
    stream: bool | None = Field(None, description="server-sent events as text is generated")
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(
        None, ge=0, le=5, description="log-probabilities of the chosen and top characters"
    )
    echo: bool | None = Field(None, description="return the prompt before the completion")
    user: str | None = Field(None, description="accepted and ignored")
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # extensions
    top_k: int | None = sample_field("top_k")
    on_unknown: Literal["error", "skip"] | None = sample_field("on_unknown")
    _config: SampleConfig = PrivateAttr()  # the sampling controls, built once by `sampling`

    @field_validator("prompt", mode="before")
    @classmethod
    def prompt_shapes(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if not (is_text_or_texts(value) or is_ids(value) or is_lists_of_ids(value)):
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of "
                "lists of token ids"
            )
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def few_stops(cls, value: Any) -> Any:
        if value is not None and not is_text_or_texts(value):
            raise ValueError("stop must be a string or a list of strings")
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(value)}")
        return value

    @field_validator(*NEUTRAL)
    @classmethod
    def neutral_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value != NEUTRAL[info.field_name]:
            raise ValueError(
                f"{info.field_name} is not supported by this server: leave it out "
                f"(or send {NEUTRAL[info.field_name]!r})"
            )
        return value

    @model_validator(mode="after")
    def sampling(self) -> CompletionRequest:
        """The sampling controls as `chargpt sample` takes them (unset: SampleConfig's
        defaults), built once; a value it refuses is an error about that request field."""
        controls = {
            "max_new_tokens": DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
            "num_samples": self.n or 1,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop,
            "seed": self.seed,
            "on_unknown": self.on_unknown,
        }
        given = {k: v for k, v in controls.items() if v is not None}
        try:
            self._config = sample_config(**given)
        except OptionError as err:
            field = REQUEST_FIELDS.get(err.option, err.option)
            raise field_error(field, str(err), given.get(err.option)) from None
        return self

    @model_validator(mode="after")
    def usage_needs_a_stream(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """Each prompt: a text or its token ids."""
        return self.prompt if self.several_prompts else [self.prompt]  # type: ignore[return-value]

    @property
    def several_prompts(self) -> bool:
        """Whether `prompt` is a list of prompts (texts or lists of ids), not a single one."""
        return isinstance(self.prompt, list) and not isinstance(self.prompt[0], int)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def job(self, tokenizer: CharTokenizer, settings: ServeConfig) -> Job:
        """The engine's job: each prompt as the model reads it, within the vocabulary and the
        server's limits (each refusal an `APIError`)."""
        config, prompts = self._config, self.prompts
        check_prompt_length(sum(map(len, prompts)), settings)
        texts = [self.prompt_text(i, tokenizer) for i in range(len(prompts))]
        check_size(len(prompts), config, settings)
        if self.echo:
            check_echo(sum(map(len, texts)), config.num_samples, self.logprobs, settings)
        ids = [encode_prompt(tokenizer, text) for text in texts]  # "" reads a newline
        return Job(ids, config, self.logprobs, bool(self.echo), texts)

    def prompt_text(self, i: int, tokenizer: CharTokenizer) -> str:
        """Prompt i as the model reads it and echo returns it: a text (a character the model never
        saw is an error, or skipped), or the text its token ids spell (an id outside the
        vocabulary is an error that names its position)."""
        prompt = self.prompts[i]
        where = f"prompt[{i}]" if self.several_prompts else "prompt"
        if not isinstance(prompt, str):
            check_ids(prompt, where, tokenizer)
            return tokenizer.decode(prompt)
        if self._config.on_unknown == "skip":
            return "".join(c for c in prompt if c in tokenizer.stoi)
        check_known(prompt, where, "prompt", tokenizer)
        return prompt


def field_error(field: str, message: str, value: Any) -> ValidationError:
    """A validation error about `field`, for a check that runs on the whole request."""
    error = PydanticCustomError("value_error", "{error}", {"error": message})
    details = InitErrorDetails(type=error, loc=(field,), input=value)
    return ValidationError.from_exception_data(CompletionRequest.__name__, [details])


def is_text_or_texts(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


def is_ids(value: Any) -> bool:
    """A list of token ids (JSON integers: not booleans)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def is_lists_of_ids(value: Any) -> bool:
    return isinstance(value, list) and all(is_ids(v) for v in value)


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Choice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """The response, and (with `choices` of one piece each) every chunk of a stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chargpt"
    # extensions the playground reads
    context_length: int
    vocab_size: int
    parameters: int
    best_val_loss: float | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every refusal, as OpenAI shapes it."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "error"]  # error: the engine has stopped; restart the server
    model: str
    queued: int
    running: int
