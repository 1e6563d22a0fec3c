"""How the weights move: AdamW (or Muon with AdamW) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from chargpt.config import TrainConfig
from chargpt.errors import ChargptError
from chargpt.model import LanguageModel


def lr_multiplier(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup to `learning_rate`, then constant, or cosine decay to `min_lr` at step
    `lr_decay_iters` (0: `max_iters`), after which the rate stays at `min_lr`. A run with a
    time budget passes `progress`, the elapsed fraction of it, which then paces the decay."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return 1.0
    if progress is None:
        decay_iters = cfg.lr_decay_iters or cfg.max_iters
        progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # 1 -> 0
    return (cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)) / cfg.learning_rate


def configure_optimizer(model: LanguageModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only, not on biases or norm gains;
    or, for `optimizer = muon`, Muon for the decoder blocks' matrices beside that AdamW."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if name.startswith("blocks.") and p.dim() == 2]
    if cfg.optimizer != "muon":
        hidden = []
    rest = [p for _, p in named if not any(p is h for h in hidden)]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2))
    if not hidden:
        return adamw
    muon = muon_class()(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
    return MuonWithAdamW(adamw, muon)


def muon_class() -> type[torch.optim.Optimizer]:
    """torch.optim.Muon, which PyTorch ships from 2.9 on."""
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise ChargptError(
            f"--optimizer muon needs torch >= 2.9 (this is {torch.__version__}): upgrade torch "
            "or pass --optimizer adamw"
        )
    return muon


class MuonWithAdamW(torch.optim.Optimizer):
    """AdamW and Muon stepped as one optimiser. Its param groups are theirs, AdamW's first (so
    the learning rate a run logs is AdamW's), the same dicts, so that a schedule setting each
    group's lr sets it in both; its state dict numbers the parameters in that order too, as one
    optimiser over both would."""

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer):
        self.adamw, self.muon = adamw, muon
        super().__init__([p for group in self.groups() for p in group["params"]], {})
        self.param_groups = self.groups()

    def groups(self) -> list[dict[str, Any]]:
        return [*self.adamw.param_groups, *self.muon.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        self.adamw.step()
        self.muon.step()

    def state_dict(self) -> dict[str, Any]:
        state, groups, offset = {}, [], 0
        for part in (self.adamw, self.muon):
            saved = part.state_dict()
            state.update({i + offset: s for i, s in saved["state"].items()})
            for group in saved["param_groups"]:  # a part numbers its parameters from 0
                groups.append({**group, "params": [i + offset for i in group["params"]]})
            offset += sum(len(group["params"]) for group in saved["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups, offset = iter(state_dict["param_groups"]), 0
        for part in (self.adamw, self.muon):
            groups = [next(saved_groups) for _ in part.param_groups]
            size = sum(len(group["params"]) for group in groups)
            mine = range(offset, offset + size)
            part.load_state_dict(
                {
                    "state": {i - offset: s for i, s in state_dict["state"].items() if i in mine},
                    "param_groups": [
                        {**g, "params": [i - offset for i in g["params"]]} for g in groups
                    ],
                }
            )
            offset += size
        self.param_groups = self.groups()


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    progress: Callable[[], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `lr_multiplier`, stepped once per optimisation step; `progress` gives
    the elapsed fraction of a time budget when the run has one."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg, progress() if progress else None)
    )
