"""ASGI middleware that every route gets: the API key, the body size limit, request counts."""

from __future__ import annotations

import secrets

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chargpt.serve.errors import openai_error
from chargpt.serve.metrics import ServeMetrics

PROTECTED = "/v1/"  # what the API key guards; /health and /metrics stay open for probes


class RequireAPIKey:
    """With a key, /v1/ requests need `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(key.strip(), self.api_key):
            return await self.app(scope, receive, send)
        message = (
            "Incorrect API key provided"
            if given
            else "You didn't provide an API key: send it as 'Authorization: Bearer KEY'"
        )
        response = openai_error(401, message, code="invalid_api_key")
        await response(scope, receive, send)


class LimitBodySize:
    """Bodies over `max_bytes` get 413, whether they say their length up front or not."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = openai_error(413, self.message(), code="request_too_large")
            return await response(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI passes HTTPExceptions from here on
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counted, send)

    def message(self) -> str:
        return (
            f"Request body is larger than this server's limit of {self.max_bytes} bytes "
            "(--max-body-bytes): send a smaller request"
        )


class CountRequests:
    """chargpt_requests{path, status} for every answered request."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def noted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noted)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(path, str(status)).inc()
