"""`chargpt serve` through the official `openai` client and plain HTTP: a live server on 127.0.0.1,
checked against chargpt's own generate (same seeds), eval's full pass (echo logprobs) and
OpenAI's shapes."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import openai
import pytest
from serve_support import BLOCK, MODEL, eventually, make_run, serving

from chargpt.eval.evaluate import full_pass_loss
from chargpt.generation.decoders import LoopDecoder
from chargpt.generation.generate import generate
from chargpt.model.quantize import is_quantized
from chargpt.runs.directory import load_run

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "ROMEO:\nWhat light"
FP32 = {"dtype": "fp32"}  # the server's precision; bf16 (auto on some CPUs) agrees less closely


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve_api"))


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


@pytest.fixture(scope="module")
def server(run_dir):
    limits = dict(max_tokens_limit=600, max_body_bytes=4096, max_prompt_chars=2000)
    with serving(run_dir, **limits, dtype="fp32") as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_run_with_its_figures(client, run):
    (card,) = client.models.list().data
    assert card.id == MODEL
    extra = card.model_extra or {}
    assert extra["context_length"] == BLOCK
    assert extra["vocab_size"] == run.tokenizer.vocab_size
    assert extra["parameters"] == run.model.num_parameters()
    assert extra["best_val_loss"] == pytest.approx(2.5)
    assert client.models.retrieve(MODEL).id == MODEL


def test_models_counts_every_parameter_of_an_int8_model(run_dir, run):
    """Under --quantize int8 it reported ~1% of them (the int8 weights were buffers)."""
    with serving(run_dir, quantize="int8", **FP32) as served:
        assert is_quantized(served.app.state.run.model)
        (card,) = httpx.get(served.v1 + "/models", timeout=30).json()["data"]
    assert card["parameters"] == run.model.num_parameters()


def test_a_seeded_completion_is_chargpt_samples_text(client, run):
    controls = dict(temperature=0.9, top_p=0.95, seed=7)
    reply = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=70, **controls)
    expected = generate(run.model, run.tokenizer, PROMPT, max_new_tokens=70, **controls, **FP32)
    (choice,) = reply.choices
    assert reply.object == "text_completion" and reply.model == MODEL
    assert choice.text == expected[0]  # 70 characters: past block_size, window restarts
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "length", None)
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), 70)
    assert usage.total_tokens == len(PROMPT) + 70


def test_choice_i_uses_seed_plus_i_and_extensions_apply(client, run):
    reply = client.completions.create(
        model=MODEL, prompt=[PROMPT, "JULIET"], n=3, max_tokens=20, seed=11,
        extra_body={"top_k": 5},
    )  # fmt: skip
    assert [c.index for c in reply.choices] == list(range(6))
    for p, prompt in enumerate([PROMPT, "JULIET"]):
        batch = generate(run.model, run.tokenizer, prompt, max_new_tokens=20, num_samples=3,
                         seed=11, top_k=5, **FP32)  # fmt: skip
        assert [c.text for c in reply.choices[3 * p : 3 * p + 3]] == batch
    single = generate(run.model, run.tokenizer, PROMPT, max_new_tokens=20, seed=13, top_k=5, **FP32)
    assert reply.choices[2].text == single[0]
    assert reply.usage.prompt_tokens == len(PROMPT) + len("JULIET")
    assert reply.usage.completion_tokens == 6 * 20


def test_a_stream_sends_the_same_text_in_completion_chunks(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=50, seed=3)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=50, seed=3, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    *pieces, finish, usage = chunks
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in pieces) == plain.choices[0].text
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in pieces)
    assert finish.choices[0].finish_reason == "length"
    assert usage.choices == [] and usage.usage == plain.usage


def test_stop_strings_end_a_choice_before_them(client, run):
    greedy = generate(run.model, run.tokenizer, PROMPT, max_new_tokens=60, temperature=0, **FP32)[0]
    stop = greedy[25:27]
    cut = greedy.index(stop)
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop, "\u00a7"]
    )
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (greedy[:cut], "stop")
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, stop=stop, stream=True
    )
    texts = [c.choices[0].text for c in streamed]
    assert "".join(texts) == greedy[:cut] and all(stop not in t for t in texts)


@pytest.mark.parametrize("length", [BLOCK, 3 * BLOCK + 5])
def test_echo_logprobs_score_the_prompt_as_eval_does(client, run, length):
    text = (PROMPT + " doth break? It is the east, and Juliet is the sun.") * 3
    prompt = text[:length]
    reply = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2
    )
    (choice,) = reply.choices
    lp = choice.logprobs
    assert choice.text == prompt and lp.tokens == list(prompt)
    assert lp.text_offset == list(range(length))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # as OpenAI's API
    tokens = np.array(run.tokenizer.encode(prompt))
    # prompts up to block_size: every character from all the text before it (stride 1); longer
    # ones: chargpt eval's default full pass (windows advancing by block_size // 2)
    stride = 1 if length <= BLOCK else BLOCK // 2
    loss, count = full_pass_loss(run.model, tokens, BLOCK, start=1, stride=stride)
    assert count == length - 1
    assert sum(lp.token_logprobs[1:]) == pytest.approx(-loss * count, abs=1e-4)
    for logprob, top, token in zip(
        lp.token_logprobs[1:], lp.top_logprobs[1:], prompt[1:], strict=True
    ):
        assert 2 <= len(top) <= 3 and top[token] == logprob  # the top 2, and the chosen one
    assert reply.usage.completion_tokens == 0 and choice.finish_reason == "length"


def test_logprobs_of_generated_characters(client):
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, logprobs=3, echo=True
    )
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == list(range(len(PROMPT) + 20))
    generated = zip(lp.token_logprobs[len(PROMPT) :], lp.top_logprobs[len(PROMPT) :], strict=True)
    for logprob, top in generated:
        assert len(top) == 3 and logprob == max(top.values())  # greedy: the likeliest
        assert math.isclose(sum(math.exp(v) for v in top.values()), 1, abs_tol=1) and logprob < 0


def test_an_api_key_is_required_when_set(run_dir):
    with serving(run_dir, api_key="s3cret") as served:
        anonymous = openai.OpenAI(base_url=served.v1, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            anonymous.models.list()
        assert err.value.body["code"] == "invalid_api_key"
        keyed = openai.OpenAI(base_url=served.v1, api_key="s3cret", max_retries=0)
        assert keyed.completions.create(model=MODEL, prompt="A", max_tokens=3).choices
        missing = httpx.post(served.v1 + "/completions", json={"model": MODEL, "prompt": "A"})
        assert missing.status_code == 401
        assert httpx.get(served.url + "/health").status_code == 200  # probes need no key


# 2,001 ids, one over the server's --max-prompt-chars, in a body under its --max-body-bytes
ID_PROMPT_OVER_LIMIT = b'{"model": "%s", "prompt": [%s]}' % (
    MODEL.encode(),
    b",".join([b"0"] * 2001),
)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        (b'{"model": "tiny', 400, None, "parse the JSON"),
        (b"[1, 2]", 400, None, "JSON object"),
        ({"prompt": "A"}, 400, "model", "model"),
        ({"model": MODEL, "prompt": "A", "max_tokens": "5"}, 400, "max_tokens", "integer"),
        ({"model": MODEL, "prompt": "A", "temperature": -1}, 400, "temperature", "temperature"),
        ({"model": MODEL, "prompt": "A", "stop": ["a"] * 5}, 400, "stop", "at most 4"),
        ({"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", "list of token ids"),
        ({"model": MODEL, "prompt": [1, True]}, 400, "prompt", "list of token ids"),
        ({"model": MODEL, "prompt": []}, 400, "prompt", "empty list"),
        ({"model": MODEL, "prompt": [[5, 6], [0, 10_000]]}, 400, "prompt[1][1]", "is 10000"),
        ({"model": MODEL, "prompt": [5, -1]}, 400, "prompt[1]", "is -1"),
        (ID_PROMPT_OVER_LIMIT, 400, "prompt", "--max-prompt-chars"),
        ({"model": MODEL, "prompt": "A", "wat": 1}, 400, "wat", "Unrecognized"),
        ({"model": MODEL, "prompt": "A", "best_of": 3}, 400, "best_of", "not supported"),
        ({"model": MODEL, "prompt": "A", "n": 2, "seed": 2**64 - 2}, 400, "seed", "less than"),
        ({"model": MODEL, "prompt": "caf\u00e9 \u2014"}, 400, "prompt", "'é', '—'"),
        ({"model": MODEL, "prompt": "A", "max_tokens": 601}, 400, "max_tokens", "601"),
        ({"model": MODEL, "prompt": "A", "n": 4, "max_tokens": 200}, 400, "max_tokens", "800"),
        ({"model": MODEL, "prompt": "A", "n": 65}, 400, "n", "--max-queue"),
        ({"model": "gpt-4", "prompt": "A"}, 404, "model", "does not exist"),
        (b'{"model": "\\ud800", "prompt": "A"}', 404, "model", "'\ud800'"),  # not UTF-8: no 500
        ({"model": MODEL, "prompt": "A" * 5000}, 413, None, "--max-body-bytes"),
        ({"model": MODEL, "prompt": ["A" * 1500] * 2}, 400, "prompt", "--max-prompt-chars"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, body, status, param, says):
    url = server.v1 + "/completions"
    if isinstance(body, bytes):
        sent = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        sent = httpx.post(url, json=body)
    error = error_of(sent, status)
    assert error["param"] == param and says in error["message"]


def test_token_id_prompts_read_as_their_text(client, run):
    """OpenAI's other prompt shapes: token ids, and lists of them, as /tokenize returns them:
    the same completion, echo and logprobs as the text they spell."""
    ids = run.tokenizer.encode(PROMPT)
    for asked in [dict(), dict(echo=True), dict(echo=True, logprobs=2), dict(logprobs=0)]:
        controls = dict(model=MODEL, max_tokens=20, seed=5, **asked)
        expected = client.completions.create(prompt=PROMPT, **controls)
        for prompt in (ids, [ids]):
            reply = client.completions.create(prompt=prompt, **controls)
            assert_same_choices(reply, expected)
            assert reply.usage == expected.usage
    several = dict(model=MODEL, max_tokens=10, seed=3, echo=True, logprobs=1)
    as_ids = client.completions.create(prompt=[ids, [], run.tokenizer.encode("JULIET")], **several)
    as_text = client.completions.create(prompt=[PROMPT, "", "JULIET"], **several)
    assert_same_choices(as_ids, as_text)  # an empty list of ids is an empty prompt


def assert_same_choices(reply, expected) -> None:
    assert [c.text for c in reply.choices] == [c.text for c in expected.choices]
    for choice, other in zip(reply.choices, expected.choices, strict=True):
        if other.logprobs is None:
            assert choice.logprobs is None
            continue
        assert choice.logprobs.tokens == other.logprobs.tokens
        assert choice.logprobs.text_offset == other.logprobs.text_offset
        assert choice.logprobs.token_logprobs == pytest.approx(other.logprobs.token_logprobs)


def test_unknown_characters_can_be_skipped(client):
    reply = client.completions.create(
        model=MODEL, prompt="caf\u00e9", max_tokens=5, echo=True, extra_body={"on_unknown": "skip"}
    )
    assert reply.choices[0].text.startswith("caf") and reply.usage.prompt_tokens == 3


def test_chat_unknown_urls_and_methods(server):
    chat = error_of(httpx.post(server.v1 + "/chat/completions", json={}), 404)
    assert "/v1/completions" in chat["message"] and "chat" in chat["message"].lower()
    assert "Invalid URL" in error_of(httpx.get(server.v1 + "/nothing"), 404)["message"]
    error_of(httpx.get(server.v1 + "/completions"), 405)
    error_of(httpx.post(server.v1 + "/completions", content=b"x" * 5000), 413)


def test_health_and_prometheus_metrics(server, client):
    client.completions.create(model=MODEL, prompt="A", max_tokens=4)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in (
        'chargpt_requests_total{path="/v1/completions",status="200"}',
        "chargpt_queue_depth",
        "chargpt_batch_size_bucket",
        "chargpt_generated_characters_total",
        "chargpt_time_to_first_character_seconds_bucket",
        "chargpt_character_latency_seconds_bucket",
    ):
        assert name in text


def test_a_full_queue_answers_429_with_retry_after(run_dir):
    with serving(run_dir, max_batch=1, max_queue=2, max_tokens_limit=100_000) as served:
        url = served.v1 + "/completions"
        long = {"model": MODEL, "prompt": "A", "max_tokens": 50_000, "n": 2, "stream": True}
        with httpx.stream("POST", url, json=long, timeout=30) as stream:
            lines = stream.iter_lines()
            next(lines)  # running: one choice in the batch, the other queued
            busy = httpx.post(url, json={"model": MODEL, "prompt": "B", "n": 2})
            assert error_of(busy, 429)["code"] == "queue_full"
            assert busy.headers["Retry-After"] == "1"
        # the client left: its choices leave the batch and the queue at the next step
        reply = httpx.post(url, json={"model": MODEL, "prompt": "B", "max_tokens": 3}, timeout=30)
        assert reply.status_code == 200
        engine = served.app.state.engine
        assert eventually(lambda: (engine.queued, len(engine.running)) == (0, 0))


@pytest.mark.parametrize(("kind", "attention"), [("bigram", "fused"), ("gpt", "reference")])
def test_bigram_and_reference_runs_are_served_by_the_labs_loop(tmp_path, kind, attention):
    run_dir = make_run(tmp_path, kind, attention)
    run = load_run(run_dir)
    prompts = [PROMPT, "A"]
    with serving(run_dir, dtype="fp32") as served:
        assert isinstance(served.app.state.engine.decoder, LoopDecoder)
        client = openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0)
        reply = client.completions.create(
            model=MODEL, prompt=prompts, n=2, max_tokens=2 * BLOCK, seed=5
        )
    for p, prompt in enumerate(prompts):
        expected = generate(
            run.model, run.tokenizer, prompt, max_new_tokens=2 * BLOCK, num_samples=2, seed=5,
            **FP32,
        )  # fmt: skip
        assert [c.text for c in reply.choices[2 * p : 2 * p + 2]] == expected


def test_a_non_streaming_client_that_leaves_frees_its_slots(run_dir):
    with serving(run_dir, max_tokens_limit=1_000_000) as served:
        body = {"model": MODEL, "prompt": "A", "max_tokens": 500_000, "n": 2}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.v1 + "/completions", json=body, timeout=0.5)
        engine = served.app.state.engine
        assert eventually(lambda: (engine.queued, len(engine.running)) == (0, 0))


def test_an_engine_failure_fails_its_requests_and_the_engine_goes_on(run_dir, monkeypatch):
    with serving(run_dir) as served:
        decoder = served.app.state.engine.decoder

        def broken(next_ids: dict[int, int]) -> None:
            monkeypatch.undo()  # fails once
            raise RuntimeError("out of memory")

        url = served.v1 + "/completions"
        body = {"model": MODEL, "prompt": "A", "max_tokens": 5}
        monkeypatch.setattr(decoder, "append", broken)
        assert error_of(httpx.post(url, json=body), 500)["type"] == "server_error"
        monkeypatch.setattr(decoder, "append", broken)
        streamed = httpx.post(url, json={**body, "stream": True}).text.strip().split("\n\n")
        assert json.loads(streamed[-1].removeprefix("data: "))["error"]["type"] == "server_error"
        assert httpx.post(url, json=body).status_code == 200
