"""How the weights move: AdamW (or Muon with AdamW) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from chargpt.config import TrainConfig
from chargpt.errors import ChargptError
from chargpt.models import LanguageModel


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
    return MuonWithAdamW(muon, adamw)


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
    """Muon and AdamW stepped as one optimiser. Its param groups are theirs (Muon's first), the
    same dicts, so a schedule that sets each group's lr sets it in both; its state dict numbers
    the parameters Muon's first, as one optimiser over both would."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        params = [p for o in (muon, adamw) for group in o.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.param_groups = [*muon.param_groups, *adamw.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        self.muon.step()
        self.adamw.step()

    def muon_size(self) -> int:
        return sum(len(group["params"]) for group in self.muon.param_groups)

    def state_dict(self) -> dict[str, Any]:
        muon, adamw, offset = self.muon.state_dict(), self.adamw.state_dict(), self.muon_size()
        state = {**muon["state"], **{i + offset: s for i, s in adamw["state"].items()}}
        adamw_groups = [
            {**g, "params": [i + offset for i in g["params"]]} for g in adamw["param_groups"]
        ]
        return {"state": state, "param_groups": muon["param_groups"] + adamw_groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        offset, n_muon = self.muon_size(), len(self.muon.param_groups)
        groups, state = state_dict["param_groups"], state_dict["state"]
        self.muon.load_state_dict(
            {
                "state": {i: s for i, s in state.items() if i < offset},
                "param_groups": groups[:n_muon],
            }
        )
        adamw_groups = [{**g, "params": [i - offset for i in g["params"]]} for g in groups[n_muon:]]
        adamw_state = {i - offset: s for i, s in state.items() if i >= offset}
        self.adamw.load_state_dict({"state": adamw_state, "param_groups": adamw_groups})
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]


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
