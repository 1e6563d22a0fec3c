"""JSON for large answers, written in pieces by pydantic-core: each call holds the interpreter
lock for one small piece, so that a worker thread writing megabytes never stalls the event loop
(and `/health`) for more than a few milliseconds."""

from __future__ import annotations

from typing import Any

from pydantic_core import to_json

PIECE = 2048  # list items per call: a few milliseconds for logprobs entries with 5 alternatives


def json_list(values: list[Any]) -> bytes:
    """A list as JSON, PIECE items per call."""
    pieces = [to_json(values[i : i + PIECE])[1:-1] for i in range(0, len(values), PIECE)]
    return b"[" + b",".join(pieces) + b"]"


def json_in_pieces(value: Any, depth: int) -> bytes:
    """`value` as JSON, its dicts and lists split `depth` levels down, the lists left at the
    bottom written PIECE items per call."""
    if depth > 0 and isinstance(value, dict):
        items = (to_json(k) + b":" + json_in_pieces(v, depth - 1) for k, v in value.items())
        return b"{" + b",".join(items) + b"}"
    if depth > 0 and isinstance(value, list):
        return b"[" + b",".join(json_in_pieces(v, depth - 1) for v in value) + b"]"
    return json_list(value) if isinstance(value, list) else to_json(value)
