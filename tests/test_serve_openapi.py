"""The OpenAPI document is correct: every `$ref` resolves, bodies are required, every status
and media type the server answers is documented; and schemathesis, fuzzing each operation from
the document against a live server on 127.0.0.1 (a few examples each), finds no 5xx and no
answer that breaks the document."""

from __future__ import annotations

import copy
import json
import re

import httpx
import pytest
from serve_support import MODEL, make_run, serving

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLES = 6  # per operation: bounded, the whole module runs in seconds
LIMITS = dict(max_tokens_limit=64, max_prompt_chars=256, max_body_bytes=4096, max_queue=16)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serving(make_run(tmp_path_factory.mktemp("openapi")), **LIMITS, dtype="fp32") as served:
        yield served


@pytest.fixture(scope="module")
def document(served) -> dict:
    return httpx.get(served.url + "/openapi.json", timeout=30).json()


def operations(document: dict):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_every_reference_resolves_and_every_body_is_required(document):
    text = json.dumps(document)
    assert "$defs" not in text
    schemas = document["components"]["schemas"]
    for name in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text):
        assert name in schemas, name
    bodies = [
        (path, op["requestBody"]) for path, _, op in operations(document) if "requestBody" in op
    ]
    assert {path for path, _ in bodies} == {
        "/v1/completions",
        "/v1/inspect",
        "/tokenize",
        "/detokenize",
    }
    assert all(body["required"] for _, body in bodies)


def test_every_status_and_media_type_is_documented(document):
    def responses(path: str, method: str) -> dict:
        return document["paths"][path][method]["responses"]

    completions = responses("/v1/completions", "post")
    assert {"200", "400", "401", "404", "413", "415", "429", "503"} <= set(completions)
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(responses("/metrics", "get")["200"]["content"]) == {"text/plain"}
    assert "503" in responses("/health", "get")
    for path, _, operation in operations(document):
        assert "422" not in operation["responses"], path  # validation errors are OpenAI's 400


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_fuzzed_requests_get_no_5xx_and_documented_answers(served, document):
    """Each operation, EXAMPLES cases drawn from the document by schemathesis (driven by hand:
    its pytest loader does not run under this pytest). The document is the server's, except
    that `model` holds the served id, so that most cases reach the engine rather than a 404."""
    document = copy.deepcopy(document)
    for body in ("CompletionRequest", "InspectRequest", "TokenizeRequest", "DetokenizeRequest"):
        document["components"]["schemas"][body]["properties"]["model"] = {"enum": [MODEL]}
    api = schemathesis.openapi.from_dict(document)
    tried = []
    for result in api.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            case.call_and_validate(base_url=served.url, checks=CHECKS, timeout=30)

        check()
        tried.append(operation.label)
    assert len(tried) == 10, tried
