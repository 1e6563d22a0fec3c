"""The exponential moving average of the weights that `ema_decay` evaluates, samples and saves."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ExponentialMovingAverage:
    """A copy of a model (`module`) whose weights follow the model's: the first update copies
    them, each later one moves them `1 - decay` of the way, all parameters in one multi-tensor
    (foreach) lerp. The arithmetic and the `state_dict` of torch's AveragedModel with
    get_ema_multi_avg_fn (so a saved run resumes into either), without its host round trips:
    AveragedModel keeps its update count in a CPU tensor that it tests and copies to the
    device at every update, which makes a GPU step wait for the device. The models' buffers
    (masks, rotary tables) are constants, and come with the copy."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.n_averaged = 0  # updates so far

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averaged = list(self.module.parameters())
        current = [p.detach() for p in model.parameters()]
        if self.n_averaged == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1 - self.decay)
        self.n_averaged += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """AveragedModel's: the copy's weights under `module.`, and `n_averaged`."""
        weights = {f"module.{name}": t for name, t in self.module.state_dict().items()}
        return {**weights, "n_averaged": torch.tensor(self.n_averaged)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        weights = {k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"}
        self.module.load_state_dict(weights)
        self.n_averaged = int(state["n_averaged"])
