"""How the weights move: AdamW (or Muon with AdamW) and the learning-rate schedule."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from chargpt.config import TrainConfig
from chargpt.model import CausalSelfAttention, LanguageModel
from chargpt.training.precision import newton_schulz_dtype

# Keller Jordan's quintic Newton-Schulz coefficients and step count, as torch.optim.Muon's
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


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


class Optimizers:
    """Optimisers stepped as one, each over its own parameters (AdamW, and with `--optimizer
    muon` Muon for the decoder blocks' matrices), each with its own state; the schedule sets
    every group's learning rate before each step (`set_lr`), as nanoGPT does."""

    def __init__(self, **parts: torch.optim.Optimizer):
        self.parts = parts
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every part's groups, AdamW's first (the learning rate a run logs is AdamW's)."""
        return [group for part in self.parts.values() for group in part.param_groups]

    def set_lr(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def unscale(self, scaler: torch.amp.GradScaler) -> None:
        """Divide the gradients by the loss scale (before clipping them); nothing without one."""
        for part in self.parts.values():
            scaler.unscale_(part)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Step each part; with a loss `scaler` (an enabled one), a part whose gradients hold an
        inf or NaN skips its step, and the scale is updated for the next."""
        for part in self.parts.values():
            if scaler is None:
                part.step()
            else:
                scaler.step(part)
        if scaler is not None:
            scaler.update()

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Load a saved state; each group keeps this device's kernels (`foreach`, `fused`),
        whichever the saving run used."""
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
            kernels = {k: part.defaults[k] for k in ("foreach", "fused") if k in part.defaults}
            for group in part.param_groups:
                group.update(kernels)


def adamw_kernels(device: torch.device) -> dict[str, bool]:
    """AdamW's implementation on `device`: one fused kernel for all parameters on a GPU, where
    a step of a small model is bound by kernel launches; elsewhere a multi-tensor (foreach)
    step, the same arithmetic as the loop over tensors with less overhead."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def configure_optimizer(
    model: LanguageModel, cfg: TrainConfig, ns_dtype: torch.dtype | None = None
) -> Optimizers:
    """AdamW with weight decay on matrices and embeddings only, not on biases or norm gains;
    or, for `optimizer = muon`, Muon for the decoder blocks' matrices beside that AdamW. A fused
    `qkv` matrix is orthogonalised one head's query, key or value at a time, as the lab's
    separate `Head` matrices are; in `ns_dtype`, by default bf16 where bf16 matmuls are fast
    on the model's device, else fp32."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if name.startswith("blocks.") and p.dim() == 2]
    if cfg.optimizer != "muon":
        hidden = []
    rest = [p for _, p in named if not any(p is h for h in hidden)]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    device = next(model.parameters()).device
    kernels = adamw_kernels(device)
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), **kernels)
    if not hidden:
        return Optimizers(adamw=adamw)
    head_rows = {
        module.qkv.weight: module.qkv.weight.shape[1] // module.n_head
        for module in model.modules()
        if isinstance(module, CausalSelfAttention)
    }
    ns_dtype = ns_dtype or newton_schulz_dtype(device)
    muon = Muon(hidden, cfg.muon_lr, cfg.weight_decay, ns_dtype=ns_dtype, block_rows=head_rows)
    return Optimizers(adamw=adamw, muon=muon)


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-Schulz, Keller Jordan), the update of
    torch.optim.Muon (same group options and state), with three additions: a matrix named in
    `block_rows` is orthogonalised in blocks of that many rows, each alone with its own shape's
    learning-rate scale; Newton-Schulz runs in `ns_dtype` (torch's always runs in bf16, which
    is slow on CPUs without bf16 instructions); and the matrices (or blocks) of one shape are
    orthogonalised together, as one batch, with multi-tensor (foreach) momentum and weight
    updates: a few chains of batched matmuls a step instead of one chain per matrix, which is
    what a GPU needs (a small model's step is bound by kernel launches) and no slower on a
    CPU."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_dtype: torch.dtype = torch.bfloat16,
        block_rows: dict[torch.Tensor, int] | None = None,
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
        defaults.update(ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=NS_STEPS)
        super().__init__(params, defaults | {"adjust_lr_fn": None})
        self.ns_dtype = ns_dtype
        self.block_rows = {id(p): rows for p, rows in (block_rows or {}).items()}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            momentum, grads = group["momentum"], [p.grad for p in params]
            buffers = [self.momentum_buffer(p) for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)  # a moving average of gradients
            nesterov = group["nesterov"]
            updates = torch._foreach_lerp(grads, buffers, momentum) if nesterov else buffers
            by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for p, update in zip(params, updates, strict=True):
                rows = self.block_rows.get(id(p), p.shape[0])
                by_shape[(rows, p.shape[1], p.dtype, p.device)].append((p, update))
            for (rows, cols, *_), members in by_shape.items():
                self.orthogonal_step(group, rows, cols, members)

    def momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        return state["momentum_buffer"]

    def orthogonal_step(
        self,
        group: dict[str, Any],
        rows: int,
        cols: int,
        members: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Orthogonalise the updates of same-shaped blocks (rows, cols) as one batch (a lone
        matrix as a matrix, as torch's Muon does), then decay and move their parameters."""
        lr, params = group["lr"], [p for p, _ in members]
        blocks = torch.cat([update.reshape(-1, rows, cols) for _, update in members])
        ns = (group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
        orthogonal = newton_schulz(blocks[0] if len(blocks) == 1 else blocks, *ns)
        orthogonal = orthogonal.to(params[0].dtype).reshape(-1, rows, cols)  # views, if fp32
        pieces = orthogonal.split([p.numel() // (rows * cols) for p in params])
        updates = [piece.reshape(p.shape) for piece, p in zip(pieces, params, strict=True)]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])  # decoupled weight decay
        scale = math.sqrt(max(1.0, rows / cols))  # the shape's
        torch._foreach_add_(params, updates, alpha=-lr * scale)


def newton_schulz(
    g: torch.Tensor,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation of a matrix (rows, cols), or of each matrix of a
    batch (n, rows, cols), in `dtype`: the quintic Newton-Schulz iteration that takes its
    singular values close to 1 (between about 0.7 and 1.2, which trains as well as exact)."""
    a, b, c = coefficients
    add_product = torch.addmm if g.dim() == 2 else torch.baddbmm  # beta * input + alpha * m1 @ m2
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = add_product(x, add_product(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x
