"""The playground page at `/` and `POST /v1/inspect`, the chargpt extension it reads.

`POST /v1/inspect` is not part of the OpenAI API. For a text of at most the model's context
length it answers what the model computes at every position (`chargpt.generation.inspection`): the
likeliest next characters, the log-probability of every character, and each layer's and head's
attention weights over the preceding positions (the lab's `wei`), rounded to three decimals to
keep the payload small. Its errors have the completions endpoint's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from chargpt.generation.inspection import inspect_text, max_text_length
from chargpt.runs.directory import Run
from chargpt.serve.encoding import json_in_pieces
from chargpt.serve.errors import APIError, require_json
from chargpt.serve.limits import check_known, check_model
from chargpt.serve.openapi import BODY_ERRORS, errors

STATIC = Path(__file__).parent / "static"
ASSETS = {"playground.css": "text/css", "playground.js": "text/javascript"}
DECIMALS = 3
INSPECT_CONCURRENCY = 2  # inspections at a time; more wait their turn

router = APIRouter()


class InspectRequest(BaseModel):
    """Body of POST /v1/inspect."""

    model_config = ConfigDict(strict=True, extra="forbid")

    text: str = Field(description="the text to read: 1 to context_length characters")
    top_k: int = Field(10, ge=1, le=100, description="likeliest next characters per position")
    model: str | None = Field(None, description="the served model's id (optional)")
    on_unknown: Literal["error", "skip"] = Field(
        "error", description="characters the model never saw: an error, or skip them"
    )


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
def asset(name: str) -> Response:
    if name not in ASSETS:  # the page's own files only: no request path reaches the filesystem
        raise APIError(404, f"Invalid URL (GET /static/{name})")
    return FileResponse(STATIC / name, media_type=ASSETS[name])


@router.post(
    "/v1/inspect",
    summary="Inspect a text (chargpt extension, not in the OpenAI API)",
    responses={
        200: {"content": {"application/json": {"schema": {"type": "object"}}}},
        **errors(*BODY_ERRORS),
    },
    dependencies=[Depends(require_json)],
)
async def inspect(body: InspectRequest, request: Request) -> Response:
    """What the model computes at every position of `text`. `attention[layer][head][t]` holds
    position t's weights over positions 0..t (the lab's `wei`: softmax(q kᵀ / √head_size),
    causal, before dropout); `top[t]` lists the likeliest characters to follow position t;
    `logprobs[t]` holds the natural log-probability of each character of `vocab`. A bigram
    model has no attention: `n_layer` is 0 and `note` says why."""
    state = request.app.state
    check_model(body.model, request)
    check_text(body.text, body.on_unknown, state.run)
    run = state.run

    def answer() -> bytes:  # beside the engine's thread; its JSON is large, written in pieces
        seen = inspect_text(run.model, run.tokenizer, body.text, body.top_k, body.on_unknown)
        found = {"object": "inspection", "model": state.model_id, **seen.to_dict(DECIMALS)}
        return json_in_pieces(found, depth=3)  # attention: each head's rows in one piece

    async with state.inspecting:  # a few at a time: each one is a forward pass and ~MBs of JSON
        return Response(await run_in_threadpool(answer), media_type="application/json")


def check_text(text: str, on_unknown: str, run: Run) -> None:
    """The completions endpoint's errors for unknown characters, and the context as the limit."""
    limit = max_text_length(run.model) or run.model_config.block_size
    if not text:
        raise APIError(400, "text is empty: send at least one character", param="text")
    if len(text) > limit:
        raise APIError(
            400,
            f"text has {len(text)} characters, more than the {limit} this model reads at once "
            f"(its context): send the last {limit}",
            param="text",
            code="context_length_exceeded",
        )
    if on_unknown == "error":
        check_known(text, "text", "text", run.tokenizer)
