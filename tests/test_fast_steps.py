"""Steps at the hardware's speed compute what the plain path computes: Newton-Schulz batched over
same-shaped matrices, Muon's multi-tensor step, the foreach EMA, AdamW's kernels, and a compile
that fails (or works) leaving training as it would be uncompiled."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_resume import MODEL, TRAIN
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import chargpt.training.compiled as compiled
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import GPTLanguageModel
from chargpt.training.ema import ExponentialMovingAverage
from chargpt.training.optim import (
    NS_COEFFICIENTS,
    NS_STEPS,
    Muon,
    adamw_kernels,
    configure_optimizer,
    newton_schulz,
)
from chargpt.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(6, 16, 48), (5, 48, 16), (4, 24, 24)])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_batched_newton_schulz_is_each_matrixs_own(shape, dtype, tolerance) -> None:
    """One batched chain (baddbmm) gives each matrix what its own chain (addmm) gives, to the
    dtype's rounding (the kernels may add in another order)."""
    torch.manual_seed(0)
    g = torch.randn(shape) * torch.logspace(-3, 1, shape[0]).reshape(-1, 1, 1)  # unlike norms
    batched = newton_schulz(g, dtype=dtype)
    for matrix, together in zip(g, batched, strict=True):
        alone = newton_schulz(matrix, dtype=dtype)
        torch.testing.assert_close(together.float(), alone.float(), atol=tolerance, rtol=0)


def per_parameter_muon_step(
    params: list[torch.Tensor], buffers: list[torch.Tensor], block_rows: dict, lr: float
) -> None:
    """Muon's step one parameter at a time (torch.optim.Muon's loop, with head blocks), in fp32:
    the plain path the batched step must agree with."""
    momentum, weight_decay = 0.95, 0.1
    for p, buffer in zip(params, buffers, strict=True):
        buffer.lerp_(p.grad, 1 - momentum)
        update = p.grad.lerp(buffer, momentum)
        rows, cols = block_rows.get(id(p), p.shape[0]), p.shape[1]
        if rows != p.shape[0]:
            update = update.reshape(-1, rows, cols)
        update = newton_schulz(update, NS_COEFFICIENTS, NS_STEPS, 1e-7, torch.float32)
        p.mul_(1 - lr * weight_decay)
        p.add_(update.reshape(p.shape), alpha=-lr * math.sqrt(max(1.0, rows / cols)))


def test_the_batched_muon_step_is_the_per_parameter_one() -> None:
    """Three same-shaped matrices, two of the transposed shape, a lone square one and two fused
    qkv matrices orthogonalised by head blocks (which share their blocks' shape): after five
    steps, the weights and momenta of the batched step are the per-parameter step's."""
    torch.manual_seed(0)
    shapes = [(24, 16)] * 3 + [(16, 24)] * 2 + [(20, 20)] + [(48, 16)] * 2
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    plain = [p.detach().clone() for p in ours]
    start = [p.detach().clone() for p in ours]
    blocks = {ours[-1]: 8, ours[-2]: 8}
    optimizer = Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, block_rows=blocks)
    plain_blocks = {id(plain[-1]): 8, id(plain[-2]): 8}
    buffers = [torch.zeros_like(p) for p in plain]
    for _ in range(5):
        for p, q in zip(ours, plain, strict=True):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        optimizer.step()
        per_parameter_muon_step(plain, buffers, plain_blocks, lr=0.02)
    for p, q, buffer, before in zip(ours, plain, buffers, start, strict=True):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], buffer)
        assert (p.detach() - before).abs().max() > 0.01  # Muon moved it


def test_the_foreach_ema_is_averaged_models() -> None:
    """The same weights as torch's AveragedModel with the EMA's multi-tensor lerp, and as the
    plain per-tensor formula, to the bit; and the same state_dict, so runs saved with either
    resume into the other."""
    torch.manual_seed(0)
    model = GPTLanguageModel(MODEL, 11)
    ours = ExponentialMovingAverage(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    plain = [p.detach().clone() for p in model.parameters()]
    for update in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        theirs.update_parameters(model)
        for average, p in zip(plain, model.parameters(), strict=True):
            average.copy_(p if update == 0 else average * 0.9 + p * (1 - 0.9))
    state, expected = ours.state_dict(), theirs.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    for average, p in zip(plain, ours.module.parameters(), strict=True):
        torch.testing.assert_close(p, average, atol=1e-6, rtol=0)  # a lerp rounds unlike a*x+b*y
    again = ExponentialMovingAverage(GPTLanguageModel(MODEL, 11), 0.9)
    again.load_state_dict(expected)
    assert again.n_averaged == 4
    assert all(torch.equal(again.state_dict()[k], expected[k]) for k in expected)


def test_adamw_runs_fused_on_a_gpu_and_foreach_elsewhere() -> None:
    assert adamw_kernels(torch.device("cuda")) == {"fused": True}
    assert adamw_kernels(torch.device("cpu")) == {"foreach": True}
    model = GPTLanguageModel(MODEL, 11)
    optimizer = configure_optimizer(model, dataclasses.replace(TRAIN, optimizer="muon"))
    assert all(g["foreach"] for g in optimizer.parts["adamw"].param_groups)


def test_a_state_saved_with_other_kernels_loads_with_this_devices() -> None:
    """A run saved on a GPU (fused AdamW) or before (torch's defaults) resumes on a CPU with the
    CPU's kernels: the saved groups' `fused` and `foreach` are not taken."""
    model = GPTLanguageModel(MODEL, 11)
    optimizer = configure_optimizer(model, TRAIN)
    saved = optimizer.state_dict()
    for group in saved["adamw"]["param_groups"]:
        group.update(fused=True, foreach=None)
    optimizer.load_state_dict(saved)
    kernels = {(g["fused"], g["foreach"]) for g in optimizer.parts["adamw"].param_groups}
    assert kernels == {(None, True)}


@pytest.fixture(scope="module")
def corpus(shakespeare: str) -> tuple[CharDataset, CharTokenizer]:
    text = shakespeare[:20_000]
    tokenizer = CharTokenizer.from_text(text)
    return CharDataset.from_text(text, tokenizer), tokenizer


def trained_losses(corpus, out, **changes) -> tuple[Trainer, list[float]]:
    dataset, tokenizer = corpus
    cfg = dataclasses.replace(TRAIN, max_iters=6, eval_interval=3, **changes)
    trainer = Trainer(MODEL, cfg, dataset, tokenizer, out)
    losses = [trainer.train_step().item() for _ in range(cfg.max_iters)]
    return trainer, losses


def test_a_compile_that_fails_trains_uncompiled_with_one_line(corpus, tmp_path, monkeypatch):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("no C++ compiler found\nmore details")

    _, eager = trained_losses(corpus, tmp_path / "eager")
    with monkeypatch.context() as patch:
        patch.setattr(compiled.torch, "compile", lambda model: Broken())
        trainer, losses = trained_losses(corpus, tmp_path / "broken", compile=True)
    assert trainer.forward is trainer.model and trainer.compile_seconds == 0.0
    assert losses == eager  # exact: the plain path, from the same state


def test_the_failure_line(corpus, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(compiled.torch, "compile", lambda model: None)  # not callable
    dataset, tokenizer = corpus
    Trainer(MODEL, dataclasses.replace(TRAIN, compile=True), dataset, tokenizer, tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("torch.compile failed (TypeError: ")
    assert lines[0].endswith("): training uncompiled")


def test_compiling_is_timed_charged_and_leaves_training_as_it_was(corpus, tmp_path, monkeypatch):
    """The compile pass (here with a stand-in compiler: the model itself) leaves the weights,
    gradients and random streams alone, so the run trains as an uncompiled one; its seconds are
    counted as training time when the run starts."""
    monkeypatch.setattr(compiled.torch, "compile", lambda model: model)
    trainer, losses = trained_losses(corpus, tmp_path / "compiled", compile=True)
    _, eager = trained_losses(corpus, tmp_path / "eager")
    assert losses == eager
    assert trainer.compile_seconds > 0
    dataset, tokenizer = corpus
    cfg = dataclasses.replace(TRAIN, compile=True, max_iters=1)
    fresh = Trainer(MODEL, cfg, dataset, tokenizer, tmp_path / "run")
    fresh.run()
    assert fresh.train_time >= fresh.compile_seconds > 0
    assert fresh.uncharged_seconds == 0.0  # charged once
