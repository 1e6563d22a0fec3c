"""`chargpt export --format onnx` and the onnxruntime backend: the graph's logits against
PyTorch's (prefill, decode steps, past block_size with the window rule), every model option,
and `chargpt sample`/`eval --backend onnxruntime` against the PyTorch backend."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import onnx
from export_support import BLOCK, TOKENIZER, decisive_gpt, decisive_run

from chargpt.cli.main import main
from chargpt.config import ModelConfig, TrainConfig
from chargpt.export import runtime, web
from chargpt.export.onnx_graph import CONFIG_KEY, VOCAB_KEY, export_model, fused_copy
from chargpt.export.runtime import OnnxDecoder, OnnxModel
from chargpt.generation.decoders import Rows, SlotDecoder, make_decoder
from chargpt.generation.speed import Work, pytorch_job
from chargpt.model import build_model
from chargpt.runs.directory import load_run, save_run

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-4
RECIPE = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="gelu", tie_embeddings=True)


@pytest.fixture(scope="module")
def run_and_graph(tmp_path_factory):
    """A run with every recipe option (relu2: in test_export_browser), exported by the command
    a user types."""
    tmp = tmp_path_factory.mktemp("cli")
    run = decisive_run(tmp / "run", **RECIPE)
    assert main(["export", "--run", str(run), "--out", str(tmp / "run.onnx")]) == 0
    return run, tmp / "run.onnx"


@pytest.fixture(scope="module", params=["lab-reference", "recipe"])
def exported(request, run_and_graph, tmp_path_factory):
    """The lab's model on its reference attention path (exported through the fused path, the
    same weights), and the CLI's run with every recipe option."""
    if request.param == "recipe":
        return decisive_gpt(**RECIPE), OnnxModel(run_and_graph[1])
    model = decisive_gpt(seed=1, attention="reference")
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_model(model, TOKENIZER, path)
    return model, OnnxModel(path)


@pytest.mark.parametrize("length", [1, 5, BLOCK])
def test_prefill_logits_match_pytorch(exported, length):
    model, graph = exported
    ids = torch.randint(
        0, TOKENIZER.vocab_size, (3, length), generator=torch.Generator().manual_seed(length)
    )
    logits, presents = graph.run(ids.numpy(), graph.empty_pasts(3))
    with torch.no_grad():
        expected = model.logits(ids)
    np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
    assert all(p.shape == (3, 4, length, 8) for p in presents)


def test_decode_steps_match_the_cached_decoder_past_block_size(exported):
    """Both decoders fed the same ids, 3 x block_size of them: prefill, steps, and the window
    rule's restarts agree at every position."""
    model, graph = fused_copy(exported[0]), exported[1]  # the reference path has no KV cache
    ids = torch.randint(
        0, TOKENIZER.vocab_size, (2, 3 * BLOCK + 5), generator=torch.Generator().manual_seed(0)
    )
    for exact in (False, True):
        prompt = ids[:, :5]
        mode = "exact" if exact else "window"
        with torch.no_grad():
            ours, theirs = (
                Rows(OnnxDecoder(graph, 2, 0.5, exact), prompt),
                make_decoder(model, prompt, long_context=mode),
            )
            for t in range(5, ids.shape[1]):
                np.testing.assert_allclose(ours.logits, theirs.logits, atol=TOLERANCE, rtol=0)
                ours.append(ids[:, t : t + 1])
                theirs.append(ids[:, t : t + 1])


def test_onnx_slots_that_start_step_and_end_apart_match_pytorchs_slots(exported):
    """Two slots read together (one run of pasts), then stepping apart (the run splits), one
    freed and started again, a third joining late, all past block_size: at every step each
    busy slot's logits are PyTorch's `SlotDecoder`'s."""
    model, graph = fused_copy(exported[0]), exported[1]
    ids = torch.randint(
        0, TOKENIZER.vocab_size, (3, 4 * BLOCK), generator=torch.Generator().manual_seed(1)
    ).tolist()
    decoders = (OnnxDecoder(graph, 3), SlotDecoder(model, 3))
    with torch.no_grad():
        for decoder in decoders:
            decoder.start_batch({0: ids[0][:4], 1: ids[1][:4]})
        for t in range(3 * BLOCK):
            busy = [0, 1, 2] if t >= 10 else [0, 1]
            next_ids = {s: ids[s][4 + t] for s in busy if not (s == 1 and t % 3 == 0)}
            for decoder in decoders:
                if t == 10:
                    decoder.start(2, ids[2][:9])
                if t == 2 * BLOCK:
                    decoder.free(1)
                    decoder.start(1, ids[1][:5])
                decoder.append(next_ids)
            ours, theirs = (decoder.logits(busy) for decoder in decoders)
            np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)


def test_the_graph_carries_the_vocabulary_and_config_and_checks_clean(run_and_graph):
    run, path = run_and_graph
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[VOCAB_KEY])["chars"] == list(TOKENIZER.chars)
    config = json.loads(meta[CONFIG_KEY])
    assert (config["pos_emb"], config["mlp"], config["block_size"]) == ("rope", "gelu", BLOCK)
    names = [i.name for i in proto.graph.input]
    assert names == ["ids", "past.0.key", "past.0.value", "past.1.key", "past.1.value"]


def sample(capsys, run, *flags: str) -> str:
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--prompt", "abc", *flags]) == 0
    return capsys.readouterr().out


def test_sample_with_onnxruntime_gives_pytorchs_text(run_and_graph, capsys):
    run, path = run_and_graph
    onnx = ["--backend", "onnxruntime", "--onnx", str(path)]
    for controls in (
        ["--temperature", "0", "--max-new-tokens", str(3 * BLOCK)],  # greedy, past block_size
        ["--temperature", "0", "--max-new-tokens", "40", "--long-context", "exact"],
        [
            "--temperature",
            "0.9",
            "--top-k",
            "4",
            "--top-p",
            "0.9",
            "--seed",
            "3",
            "--num-samples",
            "3",
            "--max-new-tokens",
            "30",
            "--stop",
            "j",
        ],
    ):
        expected = sample(capsys, run, *controls)
        assert sample(capsys, run, *controls, *onnx) == expected
        assert len(expected) > 20


def test_eval_with_onnxruntime_gives_pytorchs_loss(run_and_graph, tmp_path, capsys):
    """Without --onnx, the run is exported to a temporary file first."""
    run, _ = run_and_graph
    text = tmp_path / "text.txt"
    text.write_text("abc def ghij\n" * 40, encoding="utf-8")
    common = ["eval", "--run", str(run), "--data", str(text), "--json", "--eval-iters", "2"]
    losses = []
    for backend in (["--backend", "pytorch"], ["--backend", "onnxruntime"]):
        capsys.readouterr()
        assert main([*common, *backend]) == 0
        losses.append(json.loads(capsys.readouterr().out))
    for key in ("val_loss", "estimate_train"):
        assert losses[0][key] == pytest.approx(losses[1][key], abs=TOLERANCE)


def test_cached_keys_reach_the_attention_product_through_one_transpose(run_and_graph):
    """onnxruntime folds a Transpose that feeds a MatMul into the product; the exporter's own
    attention reshaped the keys around it, which copied every cached key at every step."""
    _, path = run_and_graph
    graph = onnx.load(str(path)).graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for i in range(2):
        (transpose,) = consumers[f"present.{i}.key"]
        assert transpose.op_type == "Transpose"
        assert list(transpose.attribute[0].ints) == [0, 1, 3, 2]
        assert [node.op_type for node in consumers[transpose.output[0]]] == ["MatMul"]
    assert not any(node.op_type == "IsNaN" for node in graph.node)


def test_the_session_is_the_candidate_timed_fastest(run_and_graph, monkeypatch):
    """Start-up timings faked: each candidate wins once; a thread count given is used as it is,
    with nothing timed."""
    _, path = run_and_graph
    for fastest in runtime.CANDIDATES:

        def seconds(jobs: dict, fastest=fastest, **_options: object) -> dict:
            assert set(jobs) == set(runtime.CANDIDATES)
            return {settings: 1.0 if settings == fastest else 2.0 for settings in jobs}

        monkeypatch.setattr(runtime, "fastest_seconds", seconds)
        graph = OnnxModel(path)
        options = graph.session.get_session_options()
        assert graph.settings == fastest
        assert options.intra_op_num_threads == fastest.threads
        spinning = options.get_session_config_entry("session.intra_op.allow_spinning")
        assert spinning == str(int(fastest.spin))
    monkeypatch.setattr(runtime, "fastest_seconds", None)  # not called
    graph = OnnxModel(path, threads=2)
    assert graph.session.get_session_options().intra_op_num_threads == 2


@pytest.mark.parametrize("work", [Work(rows=2), Work(scoring=True)])
def test_onnxruntime_and_pytorch_time_the_same_work(run_and_graph, work):
    """The jobs the start-up timings compare compute the same thing: the same ids drawn from
    the same logits after the same (zero) pasts, or the same window's logits."""
    run, path = run_and_graph
    graph, model = OnnxModel(path, threads=1), load_run(run, "cpu").model
    ours, theirs = graph.job(work)(), pytorch_job(model, work)()
    if work.scoring:
        np.testing.assert_allclose(ours[0], theirs.numpy(), atol=TOLERANCE, rtol=0)
        assert ours[0].shape == (1, BLOCK, TOKENIZER.vocab_size)
    else:
        assert torch.equal(ours, theirs) and ours.shape == (2, 1)


@pytest.mark.parametrize("onnx_ms", [3.0, 1.0])
def test_sample_and_eval_say_when_onnxruntime_is_slower_than_pytorch_here(
    run_and_graph, capsys, monkeypatch, tmp_path, onnx_ms
):
    """One line with both start-up timings (faked here) where onnxruntime is the slower."""
    import chargpt.generation.speed as speed

    run, path = run_and_graph
    asked = "--backend onnxruntime"
    seconds = {asked: onnx_ms / 1000, "fp32": 0.002}
    monkeypatch.setattr(speed, "fastest_seconds", lambda jobs, **_: seconds)
    text = tmp_path / "text.txt"
    text.write_text("abc def ghij\n" * 40, encoding="utf-8")
    onnx = ["--backend", "onnxruntime", "--onnx", str(path)]
    sample = ["sample", "--run", str(run), "--max-new-tokens", "5", *onnx]
    evaluate = ["eval", "--run", str(run), "--data", str(text), "--eval-iters", "1", *onnx]
    for command, unit in ((sample, "character"), (evaluate, "window")):
        assert main(command) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if "slower" in line]
        note = (
            f"note: {asked} is slower than fp32 PyTorch on this machine (3.0 vs 2.0 ms a {unit}"
            ", timed at start-up)"
        )
        assert notes == ([note] if onnx_ms > 2 else [])


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_mistakes_get_one_line_that_names_the_fix(run_and_graph, tmp_path, capsys):
    run, path = run_and_graph
    other = decisive_run(tmp_path / "other", n_layer=1)
    bigram = tmp_path / "bigram"
    onnx = ["--backend", "onnxruntime", "--onnx", str(path)]
    assert "not exported from" in one_line_error(capsys, ["sample", "--run", str(other), *onnx])
    assert "fp32 graph" in one_line_error(
        capsys, ["sample", "--run", str(run), *onnx, "--quantize", "int8"]
    )
    assert "*.onnx" in one_line_error(capsys, ["export", "--run", str(run), "--out", str(tmp_path)])
    config = ModelConfig(model="bigram", block_size=BLOCK)
    save_run(bigram, build_model(config, TOKENIZER.vocab_size), TOKENIZER, config, TrainConfig())
    err = one_line_error(
        capsys, ["export", "--run", str(bigram), "--out", str(tmp_path / "b.onnx")]
    )
    assert "--model gpt" in err and not (tmp_path / "b.onnx").exists()
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_text("hello", encoding="utf-8")
    assert "make it with chargpt export" in one_line_error(
        capsys, ["sample", "--run", str(run), "--backend", "onnxruntime", "--onnx", str(not_onnx)]
    )


def test_the_web_export_says_where_to_get_onnxruntime_web(
    run_and_graph, tmp_path, capsys, monkeypatch
):
    run, _ = run_and_graph
    monkeypatch.setenv("CHARGPT_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no npm here
    site = tmp_path / "site"
    argv = ["export", "--run", str(run), "--format", "web", "--out", str(site)]
    assert "install npm" in one_line_error(capsys, argv)
    assert "lacks ort.min.js" in one_line_error(capsys, [*argv, "--ort-dir", str(tmp_path)])
    assert not site.exists()
    site.mkdir()
    assert "already exists" in one_line_error(capsys, argv)
    assert web.cache_dir() == tmp_path / "empty-cache"


def test_without_the_export_extra_one_line_says_how_to_install_it(
    run_and_graph, capsys, monkeypatch
):
    run, path = run_and_graph
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "chargpt.export.runtime")
    argv = ["sample", "--run", str(run), "--backend", "onnxruntime", "--onnx", str(path)]
    assert "pip install 'chargpt[export]'" in one_line_error(capsys, argv)
