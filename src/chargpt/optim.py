"""How the weights move: the AdamW optimiser and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from chargpt.config import TrainConfig
from chargpt.models import LanguageModel


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `learning_rate`, then constant, or cosine decay to `min_lr` at step
    `lr_decay_iters` (0: `max_iters`), after which the rate stays at `min_lr`."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return 1.0
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return (cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)) / cfg.learning_rate


def configure_optimizer(model: LanguageModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not on biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2))


def lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `lr_multiplier`, stepped once per optimisation step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
