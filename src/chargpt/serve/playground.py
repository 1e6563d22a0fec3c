"""The playground page at `/` and `POST /v1/inspect`, the chargpt extension it reads.

`POST /v1/inspect` is not part of the OpenAI API. For a text of at most the model's context
length it answers what the model computes at every position (`chargpt.generation.inspection`): the
likeliest next characters and the log-probability of every character, rounded to three decimals,
and each layer's and head's attention weights over the preceding positions (the lab's `wei`),
packed as float16 triangles in base64. Its errors have the completions endpoint's shape. Its work
is bounded: `--max-inspect-weights` weights an answer, two inspections at a time, a few more
waiting (beyond those, 429), each built in a worker thread by tensor and byte operations, so that
the event loop (and `/health`) never waits for it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from chargpt.config import ServeConfig
from chargpt.generation.generate import encode_prompt
from chargpt.generation.inspection import attention_size, inspect_text, max_text_length
from chargpt.runs.directory import Run
from chargpt.serve.encoding import json_in_pieces
from chargpt.serve.errors import APIError, require_json
from chargpt.serve.limits import check_known, check_model
from chargpt.serve.openapi import BODY_ERRORS, errors

STATIC = Path(__file__).parent / "static"
ASSETS = {
    "playground.css": "text/css",  # shared with the exported page
    "common.js": "text/javascript",  # shared with the exported page
    "playground.js": "text/javascript",
}
CONTROLS = "controls.html"  # the prompt and sampling controls, shared with the exported page
DECIMALS = 3
INSPECT_CONCURRENCY = 2  # inspections at a time; more wait their turn
INSPECT_WAITING = 8  # inspections waiting for a turn; more get 429

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
def page() -> HTMLResponse:
    return HTMLResponse(page_html())


@functools.cache
def page_html() -> str:
    """index.html with the controls it shares with the exported page (controls.html) in place
    of its `<!-- controls.html -->` comment, as `chargpt export --format web` writes its page."""
    index = (STATIC / "index.html").read_text(encoding="utf-8")
    shared = (STATIC / CONTROLS).read_text(encoding="utf-8")
    return index.replace(f"<!-- {CONTROLS} -->", shared.strip())


@router.get("/static/{name}", include_in_schema=False)
def asset(name: str) -> Response:
    if name not in ASSETS:  # the page's own files only: no request path reaches the filesystem
        raise APIError(404, f"Invalid URL (GET /static/{name})")
    return FileResponse(STATIC / name, media_type=ASSETS[name])


class Turns:
    """Inspections `running` at a time and `waiting` more in line; beyond those, a 429 at once
    (a queue without a bound is memory without one). Used on the event loop only."""

    def __init__(self, running: int, waiting: int):
        self.running = asyncio.Semaphore(running)
        self.capacity = running + waiting
        self.waiting = waiting
        self.inside = 0  # running and waiting

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self.inside >= self.capacity:
            raise APIError(
                429,
                f"The server is busy: {self.waiting} inspections are waiting already; "
                "retry in a moment",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.inside += 1
        try:
            async with self.running:
                yield
        finally:
            self.inside -= 1


@router.post(
    "/v1/inspect",
    summary="Inspect a text (chargpt extension, not in the OpenAI API)",
    responses={
        200: {"content": {"application/json": {"schema": {"type": "object"}}}},
        **errors(*BODY_ERRORS, 429),
    },
    dependencies=[Depends(require_json)],
)
async def inspect(body: InspectRequest, request: Request) -> Response:
    """What the model computes at every position of `text`. `attention[layer][head]` is a
    string: base64 of that head's weights as little-endian float16 (2 bytes each), its lower
    triangle row after row, no zeros above the diagonal: row t (T(T + 1)/2 weights in all, row t
    starting at t(t + 1)/2) holds position t's t + 1 weights over positions 0..t (the lab's
    `wei`: softmax(q kᵀ / √head_size), causal, before dropout; float16 keeps them within
    2⁻¹² each). `top[t]` lists the likeliest characters to follow position t;
    `logprobs[t]` holds the natural log-probability of each character of `vocab` (both rounded
    to 3 decimals). A bigram model has no attention: `n_layer` is 0, `attention` is empty and
    `note` says why. An answer holds at most `--max-inspect-weights` weights (n_layer x n_head x
    T(T + 1)/2; more: 400); two inspections run at a time and a few wait (more: 429)."""
    state = request.app.state
    check_model(body.model, request)
    check_text(body.text, body.on_unknown, state.run)
    check_weights(body.text, body.on_unknown, state.run, state.settings)
    run = state.run

    def answer() -> bytes:  # beside the engine's thread; its JSON written in pieces
        seen = inspect_text(run.model, run.tokenizer, body.text, body.top_k, body.on_unknown)
        found = {"object": "inspection", "model": state.model_id, **seen.to_dict(DECIMALS)}
        return json_in_pieces(found, depth=2)  # top and logprobs: PIECE rows per call

    async with state.inspecting.turn():  # each one is a forward pass and up to MBs of JSON
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


def check_weights(text: str, on_unknown: str, run: Run, settings: ServeConfig) -> None:
    """The answer's attention weights, which grow with the square of the text, within the
    server's limit."""
    length = len(encode_prompt(run.tokenizer, text, on_unknown))
    weights = attention_size(run.model, length)
    limit = settings.max_inspect_weights
    if weights > limit:
        c = run.model_config
        most = next((t for t in range(length, 0, -1) if attention_size(run.model, t) <= limit), 0)
        raise APIError(
            400,
            f"inspecting {length} characters returns {c.n_layer} layers x {c.n_head} heads x "
            f"{length * (length + 1) // 2:,} weights = {weights:,}, more than this server's "
            f"limit of {limit:,} (--max-inspect-weights): send at most the last {most} "
            "characters",
            param="text",
            code="inspection_too_large",
        )
