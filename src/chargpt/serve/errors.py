"""Every rejection in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `APIError`; `install_error_handlers` turns it, malformed or mistyped bodies (400,
not FastAPI's 422), unknown URLs (404), other HTTP errors and unexpected failures (500) into that
shape. Other routers (the playground) reuse `APIError` and `openai_error`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
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
        return openai_error(
            self.status, self.message, self.type, self.param, self.code, self.headers
        )

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def openai_error(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An OpenAI-shaped error response."""
    return JSONResponse(error_body(message, type, param, code), status, headers=headers)


Body = TypeVar("Body", bound=BaseModel)


async def json_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body as `model`: a body not declared `application/json` is a 415 (a
    web page can send text/plain or a form to 127.0.0.1 without asking; JSON it cannot), one
    that is not valid JSON or not a valid `model` is a 400."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = f"'{media_type}'" if media_type else "none"
        raise APIError(
            415,
            f"The request body must be JSON, sent with 'Content-Type: application/json' "
            f"(got {shown})",
            code="unsupported_media_type",
        )
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False)) from None


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
    return openai_error(400, validation_message(first, param), param=param)


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
    if kind == "json_invalid":
        return f"We could not parse the JSON body of your request ({ctx.get('error')}): send JSON"
    if param is None:
        if kind == "value_error":
            return str(ctx.get("error", error.get("msg")))
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
    return openai_error(err.status_code, message, headers=err.headers)


async def handle_unexpected_error(_request: Request, err: Exception) -> JSONResponse:
    log.error("unexpected error", exc_info=err)
    return openai_error(
        500, "The server had an error while processing your request", "server_error"
    )
