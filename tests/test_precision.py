"""bf16, fp16 or fp32, by measurement on the device given: the autocast of `--dtype auto` (with a
gradient scaler for fp16), Muon's Newton-Schulz, and sampling's forward passes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist

import chargpt.model.precision as precision
import chargpt.training.precision as training_precision
from chargpt.config import ModelConfig, TrainConfig
from chargpt.model import CausalSelfAttention, GPTLanguageModel
from chargpt.model.cpu_attention import fused_causal_attention
from chargpt.model.precision import bf16_is_fast, cpu_bf16_speedup, forward_dtype, resolve_dtype
from chargpt.training.distributed import World, agreed_precision
from chargpt.training.optim import NS_COEFFICIENTS, NS_STEPS, configure_optimizer, newton_schulz
from chargpt.training.precision import TrainingPrecision

CPU = torch.device("cpu")
MUON = TrainConfig(optimizer="muon")


@pytest.fixture
def measured(monkeypatch):
    """Fake the matmul timings: `measured(fp32_seconds, bf16_seconds)`, then count probes."""
    calls = []

    def fake(fp32: float, bf16: float) -> list:
        def probe() -> dict[torch.dtype, float]:
            calls.append(1)
            return {torch.float32: fp32, torch.bfloat16: bf16}

        monkeypatch.setattr(precision, "matmul_seconds", probe)
        cpu_bf16_speedup.cache_clear()
        return calls

    yield fake
    cpu_bf16_speedup.cache_clear()  # the next user measures this machine again


def muon_ns_dtype() -> torch.dtype:
    model = GPTLanguageModel(ModelConfig(block_size=8, n_embd=16, n_head=2, n_layer=1), 10)
    return configure_optimizer(model, MUON).parts["muon"].ns_dtype


def test_a_slow_bf16_probe_picks_fp32(measured) -> None:
    """As on a CPU without bf16 instructions (or the AVX2 emulation): bf16 measured 50x slower
    than fp32, whatever the CPU's flags say."""
    calls = measured(fp32=0.001, bf16=0.05)
    assert not bf16_is_fast(CPU)
    assert resolve_dtype("auto", CPU) == torch.float32
    assert muon_ns_dtype() == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16  # what the user asks for, they get
    assert len(calls) == 1  # measured once per process


def test_a_fast_bf16_probe_picks_bf16(measured) -> None:
    measured(fp32=0.001, bf16=0.0005)
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    assert muon_ns_dtype() == torch.bfloat16
    assert resolve_dtype("fp32", CPU) == torch.float32


def test_the_probe_measures_this_machine() -> None:
    seconds = precision.matmul_seconds(size=64, repeats=2)
    assert set(seconds) == {torch.float32, torch.bfloat16}
    assert all(0 < s < 10 for s in seconds.values())


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9")
@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128), (4, 16, 64)])
def test_newton_schulz_in_fp32_agrees_with_torchs_in_bf16(shape) -> None:
    """fp32 Newton-Schulz is torch.optim.Muon's orthogonalisation, without bf16's rounding:
    within 3% of torch's (five bf16 iterations, each with a unit roundoff of 0.4%, reach about
    1.5%), and within 1e-5 of the same iterations in fp64."""
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz

    torch.manual_seed(0)
    g = torch.randn(shape)
    ours = newton_schulz(g, dtype=torch.float32)
    theirs = torch.stack(
        [
            torch_newton_schulz(m, NS_COEFFICIENTS, NS_STEPS, 1e-7)
            for m in g.reshape(-1, *shape[-2:])
        ]
    ).reshape(shape)
    exact = newton_schulz(g.double(), dtype=torch.float64)
    assert ours.dtype == torch.float32
    assert ((ours - theirs.float()).norm() / theirs.float().norm()) < 0.03
    torch.testing.assert_close(ours.double(), exact, atol=1e-5, rtol=0)
    with_bf16 = newton_schulz(g, dtype=torch.bfloat16)
    assert torch.equal(with_bf16, theirs)  # in bf16, the same to the bit


def test_a_trainer_on_a_slow_bf16_cpu_trains_in_fp32(measured, tmp_path) -> None:
    from chargpt.data.dataset import CharDataset
    from chargpt.data.tokenizer import CharTokenizer
    from chargpt.training.trainer import Trainer

    measured(fp32=0.001, bf16=0.05)
    text = "to be or not to be " * 50
    tokenizer = CharTokenizer.from_text(text)
    model = ModelConfig(block_size=8, n_embd=16, n_head=2, n_layer=1)
    train = dataclasses.replace(MUON, device="cpu", dtype="auto", max_iters=1)
    trainer = Trainer(model, train, CharDataset.from_text(text, tokenizer), tokenizer, tmp_path)
    assert trainer.dtype == torch.float32
    assert trainer.optimizer.parts["muon"].ns_dtype == torch.float32


@pytest.fixture
def attention_measured(monkeypatch):
    """Fake the attention timings: `attention_measured(fp32_seconds, bf16_seconds)`."""

    def fake(fp32: float, bf16: float) -> None:
        timings = {torch.float32: fp32, torch.bfloat16: bf16}
        monkeypatch.setattr(training_precision, "attention_seconds", lambda: timings)
        training_precision.cpu_bf16_attention_speedup.cache_clear()

    yield fake
    training_precision.cpu_bf16_attention_speedup.cache_clear()


def attention_dtypes(model: torch.nn.Module) -> set:
    return {m.attention_dtype for m in model.modules() if isinstance(m, CausalSelfAttention)}


@pytest.mark.parametrize(
    ("fp32", "bf16", "dtype", "expected"),
    [
        (0.001, 0.003, "bf16", torch.float32),  # bf16's backward measured 3x slower
        (0.003, 0.001, "bf16", None),  # bf16 measured faster: left in bf16
        (0.001, 0.003, "fp32", None),  # no autocast: nothing to change
    ],
)
def test_training_attention_runs_in_fp32_where_bf16s_is_measured_slow(
    attention_measured, fp32, bf16, dtype, expected
) -> None:
    attention_measured(fp32, bf16)
    model = GPTLanguageModel(ModelConfig(block_size=8, n_embd=16, n_head=2, n_layer=2), 10)
    chosen = TrainingPrecision.measured(dtype, CPU)
    chosen.apply(model)
    assert chosen.attention == expected
    assert attention_dtypes(model) == {expected}


@pytest.mark.parametrize("attention", [None, torch.float32, torch.bfloat16])
def test_a_training_precision_survives_json_and_codes(attention) -> None:
    chosen = TrainingPrecision(torch.bfloat16, attention, torch.float32)
    assert TrainingPrecision.from_json(json.loads(json.dumps(chosen.to_json()))) == chosen
    assert TrainingPrecision.from_codes(chosen.to_codes()) == chosen
    assert chosen.to_json()["autocast"] == "bf16"  # --dtype's names


@pytest.mark.parametrize(
    "saved",
    [
        {},
        {"autocast": "fp8", "attention": None, "newton_schulz": "fp32"},
        {"autocast": "bf16", "attention": None, "newton_schulz": "fp16"},  # never fp16
        {"autocast": None, "attention": None, "newton_schulz": "fp32"},
    ],
)
def test_a_training_precision_refuses_what_to_json_did_not_write(saved) -> None:
    with pytest.raises((KeyError, ValueError)):
        TrainingPrecision.from_json(saved)


def test_every_process_takes_rank_0s_precision(measured, attention_measured, monkeypatch):
    """Each process's timings could fall either side of a choice; rank 0's decide for all.
    Here rank 1 would measure bf16 slow, and takes rank 0's bf16 all the same."""
    measured(fp32=0.001, bf16=0.05)
    attention_measured(0.001, 0.003)
    rank0 = TrainingPrecision(torch.bfloat16, torch.float32, torch.bfloat16)
    monkeypatch.setattr(dist, "broadcast", lambda codes, src: codes.copy_(rank0.to_codes()))
    rank1 = World(rank=1, local_rank=1, size=2)
    assert agreed_precision("auto", CPU, rank1) == rank0
    assert agreed_precision("auto", CPU, World()).autocast == torch.float32  # its own


def test_the_attention_probe_measures_this_machine() -> None:
    seconds = training_precision.attention_seconds((2, 2, 16, 8), repeats=2)
    assert set(seconds) == {torch.float32, torch.bfloat16}
    assert all(0 < s < 10 for s in seconds.values())


def test_fp32_attention_under_bf16_autocast_is_fp32_sdpa_of_the_same_inputs() -> None:
    """Autocast would cast fp32 inputs back to bf16: the fp32 path computes, and takes the
    gradient of, exactly what scaled_dot_product_attention does on the inputs made fp32."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_causal_attention(q, k, v, 0.0, torch.float32)
    ours.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
    expected.sum().backward()
    assert ours.dtype == torch.float32
    assert torch.equal(ours, expected)
    for grad, leaf in zip(grads, leaves, strict=True):
        assert grad.dtype == torch.bfloat16
        assert torch.equal(grad, leaf.grad.to(torch.bfloat16))


def test_a_model_with_fp32_attention_stays_causal_and_close_to_bf16s() -> None:
    torch.manual_seed(0)
    config = ModelConfig(block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    model = GPTLanguageModel(config, 20)
    x = torch.randint(0, 20, (3, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 20
    logits = {}
    for dtype in (None, torch.float32):
        for m in model.modules():
            if isinstance(m, CausalSelfAttention):
                m.attention_dtype = dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits[dtype], _ = model(x)
            later, _ = model(changed)
        torch.testing.assert_close(later[:, :10], logits[dtype][:, :10])  # the past only
    torch.testing.assert_close(logits[None], logits[torch.float32], atol=0.05, rtol=0.05)


def test_a_resumed_run_keeps_its_precision_unless_given_a_dtype(
    measured, attention_measured, tmp_path, capsys
) -> None:
    """Resumed elsewhere (here: bf16 now measured slow), a run computes as it did; a given
    --dtype, `auto` included, decides again."""
    from chargpt.cli.main import main
    from chargpt.training.resume import resume_run

    measured(fp32=0.001, bf16=0.0005)
    attention_measured(0.001, 0.003)
    run = tmp_path / "run"
    small = ["--block-size", "8", "--n-embd", "16", "--n-layer", "1", "--batch-size", "4"]
    flags = ["--preset", "tiny", *small, "--max-iters", "2", "--optimizer", "muon"]
    assert main(["train", "--out", str(run), *flags, "--sample-chars", "0"]) == 0
    measured(fp32=0.001, bf16=0.05)
    resumed = resume_run(run, max_iters=4)
    assert resumed.precision == TrainingPrecision(torch.bfloat16, torch.float32, torch.bfloat16)
    assert attention_dtypes(resumed.model) == {torch.float32}
    assert resumed.optimizer.parts["muon"].ns_dtype == torch.bfloat16
    for given in ({"dtype": "auto"}, {"device": "cpu"}):
        again = resume_run(run, max_iters=4, **given)
        assert again.precision == TrainingPrecision(torch.float32, None, torch.float32)
    assert main(["train", "--resume", str(run), "--max-iters", "3"]) == 0
    header = capsys.readouterr().err
    assert "bfloat16 (the run's own, although a bf16 matmul measured 0.02x" in header
    assert "resume with --dtype auto to choose again)" in header


CUDA = torch.device("cuda", 0)  # built, never used: the probe is faked
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture
def gpu_measured(monkeypatch):
    """Fake a GPU's matmul timings: `gpu_measured(fp32, bf16, fp16)`; returns the devices asked."""
    asked = []

    def fake(fp32: float, bf16: float, fp16: float) -> list:
        def probe(device: torch.device) -> dict[torch.dtype, float]:
            asked.append(device)
            return {FP32: fp32, BF16: bf16, FP16: fp16}

        monkeypatch.setattr(precision, "gpu_matmul_seconds", probe)
        return asked

    return fake


# (fp32, bf16, fp16) seconds as GPUs measure them (the probe's size on an H200, a T4, a GPU
# whose half precision is slow) and what each trains in: autocast, Newton-Schulz
GPUS = {
    "native bf16 (A100, H200)": ((1.0, 0.07, 0.07), TrainingPrecision(BF16, None, BF16)),
    "emulated bf16 (T4, V100)": ((1.0, 0.9, 0.12), TrainingPrecision(FP16, None, FP32)),
    "slow half precision": ((1.0, 3.0, 2.0), TrainingPrecision(FP32, None, FP32)),
}


@pytest.mark.parametrize(("seconds", "expected"), GPUS.values(), ids=GPUS)
def test_a_gpus_precision_is_measured_on_the_gpu_given(gpu_measured, seconds, expected) -> None:
    asked = gpu_measured(*seconds)
    chosen = TrainingPrecision.measured("auto", torch.device("cuda", 1))
    assert chosen == expected
    assert chosen.scales_gradients == (expected.autocast == FP16)  # fp16: a gradient scaler
    assert set(asked) == {torch.device("cuda", 1)}  # the device given, not the current one
    assert TrainingPrecision.measured("fp32", CUDA).autocast == FP32  # a given dtype wins
    assert TrainingPrecision.measured("fp16", CUDA).scales_gradients


@pytest.mark.parametrize(("seconds", "expected"), GPUS.values(), ids=GPUS)
def test_sampling_on_a_gpu_runs_in_the_measured_dtype(gpu_measured, seconds, expected) -> None:
    """Sampling and serving: fp16 where bf16 is emulated, as for training; a CPU stays fp32."""
    gpu_measured(*seconds)
    model = GPTLanguageModel(ModelConfig(block_size=8, n_embd=16, n_head=2, n_layer=1), 10)
    assert forward_dtype(model, "auto", CUDA) == expected.autocast
    assert forward_dtype(model, "auto", CPU) == FP32
    assert forward_dtype(model, "fp16", CPU) == FP16


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        ({FP32: 1.0, BF16: 0.5}, BF16),  # a CPU's probe times no fp16: bf16 when faster
        ({FP32: 1.0, BF16: 1.0}, BF16),  # as fast: bf16 (the CPU's rule before fp16 existed)
        ({FP32: 1.0, BF16: 1.5}, FP32),
        ({FP32: 1.0, BF16: 0.14, FP16: 0.1}, BF16),  # within NATIVE_BF16_MARGIN of fp16's
        ({FP32: 1.0, BF16: 0.5, FP16: 0.1}, FP16),  # 5x fp16's time: emulated
        ({FP32: 1.0, BF16: 2.0, FP16: 0.9}, FP16),
        ({FP32: 1.0, BF16: 2.0, FP16: 1.0}, FP32),  # no faster: fp32 needs no scaler
    ],
)
def test_the_dtype_rule(seconds, expected) -> None:
    assert precision.choose_dtype(seconds) == expected


def test_the_header_says_what_a_gpus_probe_measured(gpu_measured) -> None:
    gpu_measured(1.0, 0.5, 0.1)
    assert precision.describe_probe(CUDA) == "matmuls measured bf16 2x, fp16 10x fp32's speed here"
    assert precision.describe_probe(torch.device("mps")) == ""


def test_a_precision_saved_before_fp16_existed_reads_as_it_was() -> None:
    """The JSON of last.safetensors from runs saved before: the same three names."""
    saved = {"autocast": "bf16", "attention": "fp32", "newton_schulz": "bf16"}
    assert TrainingPrecision.from_json(saved) == TrainingPrecision(BF16, FP32, BF16)
    assert TrainingPrecision.from_json({**saved, "autocast": "fp16"}).scales_gradients
