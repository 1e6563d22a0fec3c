"""vLLM's tokenizer endpoints on a live server: /tokenize and /detokenize are the run's own
tokenizer and each other's inverse, /tokenizer_info is its vocabulary, and all sit behind the
API key with the completions endpoint's errors."""

from __future__ import annotations

import httpx
import pytest
from serve_support import BLOCK, MODEL, make_run, serving

from chargpt.runs.directory import load_run

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "ROMEO:\nBut soft!"
KEY = {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve_tokens"))


@pytest.fixture(scope="module")
def served(run_dir):
    with serving(run_dir, api_key="k", max_prompt_chars=100) as served:
        yield served


def post(served, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(served.url + path, json=body, headers=KEY if headers is None else headers)


def test_tokenize_is_the_runs_tokenizer_in_vllms_shape(served, run_dir):
    tokenizer = load_run(run_dir).tokenizer
    reply = post(served, "/tokenize", {"model": MODEL, "prompt": TEXT, "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {
        "count": len(TEXT),
        "max_model_len": BLOCK,
        "tokens": tokenizer.encode(TEXT),
        "token_strs": list(TEXT),
    }
    plain = post(served, "/tokenize", {"prompt": TEXT}).json()
    assert plain["token_strs"] is None and plain["tokens"] == tokenizer.encode(TEXT)
    assert post(served, "/tokenize", {"prompt": ""}).json()["tokens"] == []  # as vLLM: no newline


def test_detokenize_inverts_tokenize(served):
    tokens = post(served, "/tokenize", {"prompt": TEXT}).json()["tokens"]
    assert post(served, "/detokenize", {"model": MODEL, "tokens": tokens}).json() == {
        "prompt": TEXT
    }


def test_tokenizer_info_is_the_vocabulary(served, run_dir):
    tokenizer = load_run(run_dir).tokenizer
    info = httpx.get(served.url + "/tokenizer_info", headers=KEY).json()
    assert info["tokenizer_class"] == "CharTokenizer" and info["model_max_length"] == BLOCK
    assert info["vocab_size"] == tokenizer.vocab_size and info["vocab"] == tokenizer.stoi


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "says"),
    [
        ("/tokenize", {"prompt": "caf\u00e9"}, 400, "prompt", "'é'"),
        ("/tokenize", {"prompt": "A" * 101}, 400, "prompt", "--max-prompt-chars"),
        ("/tokenize", {"prompt": "A", "model": "gpt-4"}, 404, "model", "does not exist"),
        ("/tokenize", {"prompt": 5}, 400, "prompt", "string"),
        ("/detokenize", {"tokens": [0, 10_000, -1]}, 400, "tokens", "-1, 10000"),
        ("/detokenize", {"tokens": [0] * 101}, 400, "tokens", "--max-prompt-chars"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(served, path, body, status, param, says):
    reply = post(served, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_the_tokenizer_endpoints_need_the_key(served):
    for path, body in [("/tokenize", {"prompt": "A"}), ("/detokenize", {"tokens": [1]})]:
        assert post(served, path, body, headers={}).status_code == 401
    assert httpx.get(served.url + "/tokenizer_info").status_code == 401
