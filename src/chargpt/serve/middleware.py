"""ASGI middleware that every route gets: the Host allow-list, the API key, the body size limit,
request counts."""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import sha256
from hmac import compare_digest
from ipaddress import ip_address

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chargpt.serve.errors import APIError
from chargpt.serve.metrics import ServeMetrics

# what the API key guards (the playground's page and files, /health and /metrics stay open)
PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


class RequireAPIKey:
    """With a key, /v1/ and tokenizer requests need `Authorization: Bearer KEY` (401 otherwise).
    Keys are compared as SHA-256 digests of their bytes (UTF-8 for the server's, as sent for
    the client's), in constant time, so any key a client sends gets an answer, never a 500."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.digest = app, sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = given.partition(b" ")
        if scheme.lower() == b"bearer" and compare_digest(
            sha256(key.strip()).digest(), self.digest
        ):
            return await self.app(scope, receive, send)
        message = (
            "Incorrect API key provided"
            if given
            else "You didn't provide an API key: send it as 'Authorization: Bearer KEY'"
        )
        headers = {"WWW-Authenticate": "Bearer"}
        response = APIError(401, message, code="invalid_api_key", headers=headers).response()
        await response(scope, receive, send)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    try:
        return host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """A listening address as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def own_names(host: str) -> list[str]:
    """The Host names of the server's own address `host`: as its banner prints the URL, and, for
    IPv6, as browsers write it (compressed)."""
    try:
        compressed = ip_address(host).compressed
    except ValueError:  # a name, such as localhost
        return [host]
    return list(dict.fromkeys([url_host(host), url_host(compressed)]))


class AllowHosts:
    """Starlette's TrustedHostMiddleware (requests whose Host is not on the list never reach a
    route: a page rebound to 127.0.0.1 by DNS sends its own name), refusing in OpenAI's shape.
    The list: the loopback names, the server's own address `listening`, and `hosts`."""

    def __init__(self, app: ASGIApp, listening: str, hosts: Sequence[str]):
        self.app = app
        self.hosts = list(dict.fromkeys([*LOOPBACK_NAMES, *own_names(listening), *hosts]))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        admitted = False

        async def admit(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal admitted
            admitted = True
            await self.app(scope, receive, send)

        async def unless_refused(message: Message) -> None:
            if admitted:  # Starlette's own plain-text refusal is replaced below
                await send(message)

        check = TrustedHostMiddleware(admit, self.hosts, www_redirect=False)
        await check(scope, receive, unless_refused)
        if not admitted:
            host = Headers(scope=scope).get("host", "")
            message = (
                f"This server does not answer to the Host {host!r}: if that name is yours, "
                "start it with --allowed-host NAME"
            )
            await APIError(400, message, code="invalid_host").response()(scope, receive, send)


class LimitBodySize:
    """Bodies over `max_bytes` get 413, whether they say their length up front or not."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = APIError(413, self.message(), code="request_too_large").response()
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
