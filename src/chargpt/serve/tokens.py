"""vLLM's tokenizer endpoints: `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`.

They are not part of OpenAI's API: vLLM added them, and evaluation harnesses and clients that
count tokens on the server call them, with vLLM's request and response shapes (kept here
field for field). A token is one character: `tokens` are the ids of the run's vocabulary.
They sit behind the API key like /v1/, and answer the completions endpoint's errors.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from chargpt.data.tokenizer import CharTokenizer
from chargpt.serve.errors import APIError, require_json
from chargpt.serve.limits import check_known, check_model, check_prompt_length
from chargpt.serve.openapi import BODY_ERRORS, errors
from chargpt.serve.schemas import Strict

router = APIRouter(tags=["vLLM tokenizer extension"])


class TokenizeRequest(Strict):
    """Body of POST /tokenize (vLLM's TokenizeCompletionRequest)."""

    model: str | None = Field(None, description="the served model's id (optional)")
    prompt: str = Field(description="text to tokenize: one token per character")
    add_special_tokens: bool = Field(True, description="accepted: a character model has none")
    return_token_strs: bool | None = Field(False, description="also return each token's text")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # the model's context length
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Strict):
    """Body of POST /detokenize (vLLM's DetokenizeRequest)."""

    model: str | None = Field(None, description="the served model's id (optional)")
    tokens: list[int] = Field(description="token ids, as /tokenize returns them")


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """vLLM answers the fields of the tokenizer's tokenizer_config.json; a character tokenizer
    is its vocabulary."""

    tokenizer_class: str
    model_max_length: int
    vocab_size: int
    vocab: dict[str, int]  # character -> token id


@router.get("/tokenizer_info", responses=errors(400, 401))
async def tokenizer_info(request: Request) -> TokenizerInfo:
    tokenizer: CharTokenizer = request.app.state.run.tokenizer
    return TokenizerInfo(
        tokenizer_class=type(tokenizer).__name__,
        model_max_length=request.app.state.run.model.context_length,
        vocab_size=tokenizer.vocab_size,
        vocab=dict(tokenizer.stoi),
    )


@router.post("/tokenize", responses=errors(*BODY_ERRORS), dependencies=[Depends(require_json)])
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """The prompt's token ids (an empty prompt has none); unknown characters are a 400."""
    check_model(body.model, request)
    state = request.app.state
    check_prompt_length(len(body.prompt), state.settings)
    check_known(body.prompt, "prompt", "prompt", state.run.tokenizer)
    ids = state.run.tokenizer.encode(body.prompt)
    return TokenizeResponse(
        count=len(ids),
        max_model_len=state.run.model.context_length,
        tokens=ids,
        token_strs=list(body.prompt) if body.return_token_strs else None,
    )


@router.post("/detokenize", responses=errors(*BODY_ERRORS), dependencies=[Depends(require_json)])
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids; an id outside the vocabulary is a 400."""
    check_model(body.model, request)
    state = request.app.state
    limit = state.settings.max_prompt_chars
    if len(body.tokens) > limit:
        raise APIError(
            400,
            f"tokens has {len(body.tokens)} ids, more than this server's limit of {limit} "
            "(--max-prompt-chars): send fewer",
            param="tokens",
        )
    tokenizer: CharTokenizer = state.run.tokenizer
    unknown = sorted({t for t in body.tokens if t not in tokenizer.itos})
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise APIError(
            400,
            f"tokens has ids outside this model's vocabulary (0 to {tokenizer.vocab_size - 1}): "
            f"{shown}",
            param="tokens",
        )
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))
