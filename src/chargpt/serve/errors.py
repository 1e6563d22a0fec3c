"""Every rejection in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `APIError` (middleware answers its `response()`); `install_error_handlers` turns it,
malformed or mistyped bodies (FastAPI's RequestValidationError: 400, not FastAPI's 422), unknown
URLs (404), other HTTP errors and unexpected failures (500) into that shape. Routes that take a
JSON body depend on `require_json` (415 for any other content type).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("chargpt.serve")


class APIError(Exception):
    """A request the server refuses, with what to answer: status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        return ErrorJSON(self.body(), self.status, headers=self.headers)

    def body(self) -> dict[str, Any]:
        fields = dict(message=self.message, type=self.type, param=self.param, code=self.code)
        return {"error": fields}


class ErrorJSON(JSONResponse):
    """JSON written in ASCII: an error may quote what a request sent, and a JSON string may hold
    a lone surrogate (a valid escape, but no UTF-8)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def require_json(request: Request) -> None:
    """A dependency of the routes that take a JSON body: a body not declared `application/json`
    is a 415 (a web page can send text/plain or a form to 127.0.0.1 without asking; JSON it
    cannot). FastAPI runs it before it validates the body, so it comes before any 400."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = f"'{media_type}'" if media_type else "none"
        raise APIError(
            415,
            f"The request body must be JSON, sent with 'Content-Type: application/json' "
            f"(got {shown})",
            code="unsupported_media_type",
        )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(HTTPException, handle_http_error)
    app.add_exception_handler(Exception, handle_unexpected_error)


async def handle_api_error(_request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, APIError)
    return err.response()


async def handle_validation_error(_request: Request, err: Exception) -> JSONResponse:
    """A body that is not JSON, not an object, or has a field of the wrong type or value: 400,
    about the first problem, with the field as `param`."""
    assert isinstance(err, RequestValidationError)
    first = err.errors()[0]
    param = None if first.get("type") == "json_invalid" else field_name(first.get("loc", ()))
    return APIError(400, validation_message(first, param), param=param).response()


def field_name(loc: Sequence[Any]) -> str | None:
    """('body', 'stop', 2) -> 'stop[2]'; the body itself -> None."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or None


def validation_message(error: Mapping[str, Any], param: str | None) -> str:
    kind, ctx = error.get("type"), error.get("ctx") or {}
    if kind == "json_invalid":  # FastAPI's: the loc ends with the character where parsing stopped
        where = error.get("loc", ())[-1:]
        at = f" at character {where[0]}" if where and isinstance(where[0], int) else ""
        return (
            f"We could not parse the JSON body of your request ({ctx.get('error')}{at}): send JSON"
        )
    if param is None:
        if kind == "value_error":
            return str(ctx.get("error", error.get("msg")))
        if kind == "missing":
            return "The request body is empty: send a JSON object"
        return "The request body must be a JSON object"
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}"
    if kind == "missing":
        return f"You must provide a {param} parameter"
    if kind == "value_error":  # our own validators: their message says what to do
        return str(ctx.get("error", error.get("msg")))
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"Invalid value for '{param}': {error.get('msg')}, got {shown}"


async def handle_http_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, HTTPException)
    if err.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif err.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(err.detail)
    return APIError(err.status_code, message, headers=err.headers).response()


async def handle_unexpected_error(_request: Request, err: Exception) -> JSONResponse:
    log.error("unexpected error", exc_info=err)
    message = "The server had an error while processing your request"
    return APIError(500, message, "server_error").response()
