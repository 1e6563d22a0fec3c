"""The playground page at `/` and `POST /v1/inspect`, the chargpt extension it reads.

`POST /v1/inspect` is not part of the OpenAI API. For a text it answers what the model computes
at every position (`chargpt.inspection.inspect_text`): the likeliest next characters, the
log-probability of every character, and each layer's and head's attention weights over the
preceding positions, rounded to three decimals to keep the payload small. Its errors have the
completions endpoint's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from chargpt.errors import ChargptError
from chargpt.inspection import inspect_text, max_text_length
from chargpt.serve.errors import openai_error

STATIC = Path(__file__).parent / "static"
ASSETS = {"playground.css": "text/css", "playground.js": "text/javascript"}
DECIMALS = 3

router = APIRouter()


class InspectRequest(BaseModel):
    """Body of POST /v1/inspect."""

    text: str = Field(description="the text to read: 1 to context_length characters")
    top_k: int = Field(10, ge=1, le=100, description="likeliest next characters per position")
    model: str | None = Field(None, description="the served model's id (optional)")


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{name}", include_in_schema=False)
def asset(name: str) -> Response:
    if name not in ASSETS:  # only the page's own files: no path ever reaches the filesystem
        return Response(status_code=404)
    return FileResponse(STATIC / name, media_type=ASSETS[name])


@router.post(
    "/v1/inspect",
    summary="Inspect a text (chargpt extension, not in the OpenAI API)",
    response_description="per position: top next characters, log-probabilities, attention",
)
def inspect(body: InspectRequest, request: Request) -> Any:
    """Next-character probabilities and attention weights at every position of `text`:
    `attention[layer][head][t]` holds position t's weights over positions 0..t (the lab's
    `wei`), `top[t]` the likeliest characters to follow position t, `logprobs[t]` the natural
    log-probability of every character of `vocab`. A bigram model has no attention
    (`n_layer` 0, and `note` says why)."""
    run = request.app.state.run
    limit = max_text_length(run.model) or run.model_config.block_size
    if not body.text:
        return openai_error(
            400, "text is empty: give at least one character", "invalid_request_error", "text"
        )
    if len(body.text) > limit:
        return openai_error(
            400,
            f"text has {len(body.text)} characters but the model reads at most {limit}: "
            f"send the last {limit}",
            "invalid_request_error",
            "text",
            "context_length_exceeded",
        )
    try:
        seen = inspect_text(run.model, run.tokenizer, body.text, top_k=body.top_k)
    except ChargptError as err:
        return openai_error(400, str(err), "invalid_request_error", "text")
    return JSONResponse({"object": "inspection", "text": body.text, **seen.to_dict(DECIMALS)})
