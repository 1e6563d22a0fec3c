"""What a request may ask, checked before the engine sees it: the model's id, the vocabulary
(characters, token ids), and the server's limits (`ServeConfig`), each refusal a 400 or 404 that
names the limit and its flag.

The work a request makes is bounded up front: characters generated (prompts x n x max_tokens,
`--max-tokens-limit`), prompt characters (`--max-prompt-chars`; a token id is one), and
characters echoed back (`--max-echo-chars`, counted as characters x n x (1 + logprobs), since
each logprob adds an entry per character to the answer).
"""

from __future__ import annotations

from fastapi import Request

from chargpt.config import SampleConfig, ServeConfig
from chargpt.data.tokenizer import CharTokenizer, UnknownCharactersError
from chargpt.serve.errors import APIError


def check_model(model_id: str | None, request: Request) -> None:
    """404 unless `model_id` is the served model's (None: not given, fine where optional)."""
    served = request.app.state.model_id
    if model_id is not None and model_id != served:
        raise APIError(
            404,
            f"The model '{model_id}' does not exist: this server serves '{served}'",
            param="model",
            code="model_not_found",
        )


def check_known(text: str, where: str, param: str, tokenizer: CharTokenizer) -> None:
    """400 listing the characters of `text` the model never saw."""
    try:
        tokenizer.check_known(text)
    except UnknownCharactersError as err:
        raise APIError(
            400,
            f'{where} has {err}: remove them, or send "on_unknown": "skip" to drop them',
            param=param,
            code="unknown_characters",
        ) from None


def check_ids(ids: list[int], where: str, tokenizer: CharTokenizer) -> None:
    """400 naming the first of `ids` outside the vocabulary by its position."""
    for j, token in enumerate(ids):
        if token not in tokenizer.itos:
            raise APIError(
                400,
                f"{where}[{j}] is {token}, not a token id of this model (0 to "
                f"{tokenizer.vocab_size - 1}): send ids as /tokenize returns them",
                param=f"{where}[{j}]",
                code="invalid_token_id",
            )


def check_prompt_length(length: int, settings: ServeConfig) -> None:
    """All of a request's prompts together: scoring them with `echo` keeps an entry per
    character until the answer is sent."""
    if length > settings.max_prompt_chars:
        raise APIError(
            400,
            f"the prompt has {length} characters, more than this server's limit of "
            f"{settings.max_prompt_chars} (--max-prompt-chars): send a shorter prompt",
            param="prompt",
            code="prompt_too_long",
        )


def check_echo(chars: int, n: int, logprobs: int | None, settings: ServeConfig) -> None:
    """Echo sends every prompt back once per choice, with an entry per logprob per character:
    the answer's size, and the time to build it, grow with their product."""
    work = chars * n * (1 + (logprobs or 0))
    if work > settings.max_echo_chars:
        raise APIError(
            400,
            f"echo would send back {chars:,} prompt characters x n {n} x (1 + logprobs "
            f"{logprobs or 0}) = {work:,}, more than this server's limit of "
            f"{settings.max_echo_chars:,} (--max-echo-chars): send a shorter prompt, or lower "
            "n or logprobs",
            param="echo",
            code="echo_too_large",
        )


def check_size(prompts: int, config: SampleConfig, settings: ServeConfig) -> None:
    """A request's choices must fit the queue, and their characters the per-request limit."""
    choices = prompts * config.num_samples
    if choices > settings.max_queue:
        raise APIError(
            400,
            f"this request asks for {choices} choices (prompts x n), more than this server's "
            f"queue holds ({settings.max_queue}, --max-queue): lower n or send fewer prompts",
            param="n",
        )
    total = choices * config.max_new_tokens
    limit = settings.max_tokens_limit
    if total > limit and choices == 1:
        raise APIError(
            400,
            f"max_tokens is {total}, more than this server's limit of {limit} characters per "
            "request (--max-tokens-limit): lower max_tokens",
            param="max_tokens",
        )
    if total > limit:
        raise APIError(
            400,
            f"this request asks for {choices} choices (prompts x n) x max_tokens "
            f"{config.max_new_tokens} = {total} characters, more than this server's limit of "
            f"{limit} (--max-tokens-limit): lower max_tokens or n, or send fewer prompts",
            param="max_tokens",
        )
