"""`torch.compile` for training, fail-safe: compiled before the first step, timed, and the plain
model where compiling fails."""

from __future__ import annotations

import time

import torch
from torch import nn

from chargpt.model.precision import autocast
from chargpt.model.timing import synchronize
from chargpt.training.precision import TrainingPrecision


def compiled_forward(
    model: nn.Module, shape: tuple[int, int], precision: TrainingPrecision
) -> tuple[nn.Module, float, str]:
    """`torch.compile(model)`, compiled now by a forward and backward pass on a batch of `shape`
    (batch, context) in the run's autocast, with the seconds that took. Where compiling fails
    (no C++ compiler or Triton, an operator or platform it does not support), `model` itself,
    0 s, and one line that says so ("" when it worked). The pass leaves the weights, their
    gradients and every random stream as they were."""
    device = next(model.parameters()).device
    compiled = torch.compile(model)
    x = torch.zeros(shape, dtype=torch.long, device=device)
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with autocast(device, precision.autocast):
                _, loss = compiled(x, x)
            loss.backward()
            synchronize(device)
    except Exception as err:  # whatever the compiler raises, training goes on without it
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        failure = f"torch.compile failed ({type(err).__name__}: {reason[:200]})"
        return model, 0.0, f"{failure}: training uncompiled"
    finally:
        model.zero_grad(set_to_none=True)
    return compiled, time.perf_counter() - start, ""
