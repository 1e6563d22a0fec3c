"""The OpenAPI document at /openapi.json (and /docs), as FastAPI generates it from the typed
request bodies, with every status a route answers documented with its media type (`errors`), the
error shape among the components, and no FastAPI 422 (validation errors are OpenAI's 400)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

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


def install_openapi(app: FastAPI) -> None:
    """Build FastAPI's document once, with the error shape added to its components and its
    422s taken out."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            found = ErrorResponse.model_json_schema(ref_template=REF)
            components.update(found.pop("$defs", {}))
            components["ErrorResponse"] = found
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
