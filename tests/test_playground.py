"""The playground's server side on a real server over HTTP: the page and its files, and
`POST /v1/inspect` (a chargpt extension) with the completions endpoint's error shapes."""

from __future__ import annotations

import base64
import math
import re

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_support import BLOCK, MODEL, make_run, serving  # noqa: E402

from chargpt.generation.inspection import inspect_text  # noqa: E402
from chargpt.runs.directory import load_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "ROMEO:\nBut soft, what light"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("playground"))


@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir) as served:
        yield served.url


def inspect(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/inspect", json=body, timeout=30)


def test_the_page_and_its_files_come_from_the_server_alone(server):
    for path, kind in [("/", "text/html"), ("/static/playground.js", "text/javascript")]:
        response = httpx.get(server + path, timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert not re.search(r"https?://", response.text), path  # no CDN, no external font
    page = httpx.get(server + "/", timeout=30).text
    assert 'id="temperature"' in page and "<!-- controls.html -->" not in page  # written in
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        assert httpx.get(server + asset, timeout=30).status_code == 200
    missing = httpx.get(server + "/static/../playground.py", timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()


def test_inspect_answers_what_inspect_text_computes(server, run_dir):
    response = inspect(server, text=TEXT, top_k=5, model=MODEL)
    assert response.status_code == 200
    data = response.json()
    run = load_run(run_dir)
    seen = inspect_text(run.model, run.tokenizer, TEXT, top_k=5)
    assert data["object"] == "inspection" and data["model"] == MODEL
    assert data["chars"] == list(TEXT) and data["vocab"] == list(run.tokenizer.chars)
    assert (data["n_layer"], data["n_head"], data["note"]) == (2, 2, None)
    assert [[c["char"] for c in row] for row in data["top"]] == [
        [c for c, _ in seen.top(t)] for t in range(len(TEXT))
    ]
    T = len(TEXT)
    for layer, head in [(0, 0), (1, 0), (1, 1)]:
        # base64 of float16s, little-endian: the lower triangle, row t of t + 1 weights after row
        # t - 1, nothing above the diagonal
        triangle = np.frombuffer(base64.b64decode(data["attention"][layer][head]), dtype="<f2")
        assert triangle.size == T * (T + 1) // 2
        rows = [triangle[t * (t + 1) // 2 : (t + 1) * (t + 2) // 2] for t in range(T)]
        assert all(row.astype(float).sum() == pytest.approx(1, abs=T * 2**-11) for row in rows)
        expected = seen.attention[layer, head].numpy()[np.tril_indices(T)]
        assert np.allclose(triangle, expected, atol=2**-12, rtol=0)  # float16's precision
    assert math.exp(data["logprobs"][3][0]) == pytest.approx(seen.probs[3, 0].item(), rel=0.01)


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "says"),
    [
        ({"text": "x" * (BLOCK + 1)}, 400, "text", "context_length_exceeded", "send the last 32"),
        ({"text": ""}, 400, "text", None, "text is empty"),
        ({"text": "Romeo ¿é?"}, 400, "text", "unknown_characters", '"on_unknown": "skip"'),
        ({"text": "R", "model": "gpt-4"}, 404, "model", "model_not_found", "serves"),
        ({"text": "R", "top_k": 0}, 400, "top_k", None, "top_k"),
        ({"text": "R", "colour": "red"}, 400, "colour", None, "Unrecognized"),
        ({}, 400, "text", None, "You must provide a text parameter"),
    ],
)
def test_bad_inspect_requests_get_openai_shaped_errors(server, body, status, param, code, says):
    response = httpx.post(server + "/v1/inspect", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert says in error["message"] and "\n" not in error["message"]


def test_unknown_characters_read_as_the_completions_endpoint_says_them(server):
    completion = httpx.post(
        server + "/v1/completions",
        json={"model": MODEL, "prompt": "Romeo ¿é?", "max_tokens": 1},
        timeout=30,
    ).json()["error"]
    inspection = inspect(server, text="Romeo ¿é?").json()["error"]
    assert inspection["message"] == completion["message"].replace("prompt", "text", 1)
    assert inspection["code"] == completion["code"]
    skipped = inspect(server, text="Romeo ¿é?", on_unknown="skip").json()
    assert skipped["chars"] == list("Romeo ?")


def test_inspect_needs_the_api_key_when_there_is_one(run_dir):
    with serving(run_dir, api_key="sesame") as served:
        assert httpx.get(served.url + "/", timeout=30).status_code == 200  # the page is open
        refused = inspect(served.url, text="R")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        allowed = httpx.post(
            served.url + "/v1/inspect",
            json={"text": "R"},
            headers={"Authorization": "Bearer sesame"},
            timeout=30,
        )
        assert allowed.status_code == 200


def test_a_bigram_has_no_attention_and_the_answer_says_so(tmp_path):
    with serving(make_run(tmp_path, kind="bigram")) as served:
        data = inspect(served.url, text=TEXT).json()
    assert data["n_layer"] == 0 and data["attention"] == []
    assert "bigram" in data["note"] and len(data["top"]) == len(TEXT)


def test_inspections_larger_than_the_limit_are_refused_naming_it(run_dir):
    """2 layers x 2 heads: 20 characters are 4 x 210 = 840 weights, 21 are 4 x 231 = 924."""
    with serving(run_dir, max_inspect_weights=840) as served:
        assert inspect(served.url, text=TEXT[:20]).status_code == 200
        refused = inspect(served.url, text=TEXT[:21])
        skipped = inspect(served.url, text=TEXT[:20] + "é", on_unknown="skip")
    assert refused.status_code == 400 and skipped.status_code == 200  # what is read counts
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == ("text", "inspection_too_large")
    assert "2 layers x 2 heads x 231 weights = 924" in error["message"]
    assert "840 (--max-inspect-weights)" in error["message"]
    assert "send at most the last 20 characters" in error["message"]
