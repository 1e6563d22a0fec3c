"""Request and response bodies of OpenAI's completions API, as pydantic models.

Requests are strict (no "5" for 5, no unknown fields: OpenAI rejects both too). The sampling
controls that `SampleConfig` also has (temperature, top_p, top_k, stop, seed, on_unknown) take
their defaults, help text and limits from it: `SampleConfig.validate` decides what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from chargpt.config import MAX_SEED, SampleConfig
from chargpt.errors import ChargptError
from chargpt.generation.generate import sample_config

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
MAX_STOP_STRINGS = 4  # as OpenAI
# OpenAI parameters a character model has no use for: accepted at their neutral value only, so
# that clients that always send them (LangChain, harnesses) work unchanged
NEUTRAL = {"best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
SAMPLE_FIELDS = {f.name: f for f in dataclasses.fields(SampleConfig)}


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
    prompt: str | list[str] = Field(description="text to continue, or a list of texts")
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

    @field_validator("prompt", mode="before")
    @classmethod
    def text_prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if not is_text_or_texts(value):
            raise ValueError(
                "prompt must be a string or a list of strings (token-id prompts are not "
                "supported: a character model reads text)"
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

    @field_validator("temperature", "top_p", "top_k", "seed", "stop")
    @classmethod
    def sample_config_allows(cls, value: Any, info: ValidationInfo) -> Any:
        """SampleConfig.validate decides: one source of truth with `chargpt sample`."""
        if value is not None:
            try:
                sample_config(**{info.field_name: value})
            except ChargptError as err:
                raise ValueError(str(err)) from None
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
    def usage_needs_a_stream(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sample_config(self) -> SampleConfig:
        """The sampling controls as `chargpt sample` takes them (unset: SampleConfig's defaults)."""
        controls = {
            "max_new_tokens": DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
            "num_samples": self.choices_per_prompt,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": self.stop,
            "seed": self.seed,
            "on_unknown": self.on_unknown,
        }
        return sample_config(**{k: v for k, v in controls.items() if v is not None})


def is_text_or_texts(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


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
