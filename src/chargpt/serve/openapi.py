"""The OpenAPI document at /openapi.json (and /docs): every request body a `$ref` into
`components/schemas` that resolves (the bodies are parsed by hand, by `json_body`, so FastAPI
does not see them), every status a route answers documented with its media type, and no
FastAPI 422 (validation errors are OpenAI's 400)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from chargpt.serve.schemas import ErrorResponse

REF = "#/components/schemas/{model}"
STATUSES = {
    400: "Invalid request (also: a Host name the server does not answer to)",
    401: "Missing or wrong API key (with a key set)",
    404: "Unknown model or URL",
    413: "Request body over --max-body-bytes",
    415: "Body not sent as application/json",
    429: "Queue full: retry after Retry-After seconds",
    503: "The server is shutting down, or its engine stopped",
}
BODY_ERRORS = (400, 401, 404, 413, 415)  # what a JSON body route on /v1/ can answer


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for routes that answer these OpenAI-shaped errors (JSON, whatever the
    route's own media type)."""
    content = {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}
    return {s: {"description": STATUSES[s], "content": content} for s in statuses}


def json_request(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra=` for a route whose required JSON body is `model`."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install_openapi(app: FastAPI, bodies: list[type[BaseModel]]) -> None:
    """Build the document once, adding the request `bodies` and the error shape to its
    components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in [*bodies, ErrorResponse]:
                found = model.model_json_schema(ref_template=REF)
                components.update(found.pop("$defs", {}))
                components[model.__name__] = found
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
