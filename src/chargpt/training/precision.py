"""A training run's precision: the autocast dtype (with a gradient scaler for fp16), the fused
attention's and Muon's, decided once at the start (measured, for `--dtype auto`) and saved with
the run."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chargpt.model import CausalSelfAttention
from chargpt.model.precision import (
    BOTH,
    DTYPE_NAMES,
    PROBED,
    bf16_is_fast,
    resolve_dtype,
)
from chargpt.model.timing import fastest_seconds

CODES = tuple(DTYPE_NAMES)


def attention_seconds(shape: tuple[int, ...] = (8, 4, 64, 32), repeats: int = 3) -> dict:
    """Seconds of causal attention's forward and backward passes over (B, n_head, T, hs)
    queries, keys and values in fp32 and in bf16."""

    def forward_backward(dtype: torch.dtype) -> Callable[[], None]:
        q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return fastest_seconds({dtype: forward_backward(dtype) for dtype in BOTH}, repeats)


@functools.cache
def cpu_bf16_attention_speedup() -> float:
    """The same for training's fused attention, measured once per process: on CPUs where bf16
    matmuls are fast, its bf16 backward pass can still be slower than fp32's."""
    seconds = attention_seconds()
    return seconds[torch.float32] / seconds[torch.bfloat16]


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """Muon's orthogonalisation in bf16 where `device` runs it natively, else in fp32."""
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


@dataclasses.dataclass(frozen=True)
class TrainingPrecision:
    """The dtypes of one training run, decided once at its start (measured, for `--dtype auto`)
    and saved with it: a resumed run, and every process of a multi-process one, computes in the
    same dtypes, although each process's timings differ and may fall either side of a choice."""

    autocast: torch.dtype  # the projections' (fp32: no autocast; fp16: a gradient scaler)
    attention: torch.dtype | None  # the fused attention's; None: its inputs'
    newton_schulz: torch.dtype  # Muon's orthogonalisation

    def __post_init__(self) -> None:
        if self.autocast not in PROBED or self.newton_schulz not in BOTH:
            raise ValueError(f"no training precision: {self}")

    @property
    def scales_gradients(self) -> bool:
        """Whether the loss is scaled (torch.amp.GradScaler): fp16's narrow range would
        flush small gradients to zero; bf16 has fp32's range."""
        return self.autocast == torch.float16

    @classmethod
    def measured(cls, name: str, device: torch.device) -> TrainingPrecision:
        """`name`'s autocast (see resolve_dtype); attention in fp32 under bf16 autocast on a
        CPU where bf16's fused attention is measured slower (its backward pass); Newton-Schulz
        in bf16 where the device runs bf16 natively, else in fp32."""
        autocast = resolve_dtype(name, device)
        slow = autocast == torch.bfloat16 and device.type == "cpu"
        slow = slow and cpu_bf16_attention_speedup() < 1
        return cls(autocast, torch.float32 if slow else None, newton_schulz_dtype(device))

    def apply(self, model: nn.Module) -> None:
        """Set the attention dtype of `model`'s layers."""
        for module in model.modules():
            if isinstance(module, CausalSelfAttention):
                module.attention_dtype = self.attention

    def to_json(self) -> dict[str, str | None]:
        return {name: DTYPE_NAMES.get(dtype) for name, dtype in vars(self).items()}

    @classmethod
    def from_json(cls, saved: dict[str, str | None]) -> TrainingPrecision:
        """Undo `to_json`; KeyError for anything it did not write."""
        dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
        return cls(**{f.name: dtypes[saved[f.name]] for f in dataclasses.fields(cls)})

    def to_codes(self) -> torch.Tensor:
        """As a tensor of small integers, for collectives (see from_codes)."""
        return torch.tensor([CODES.index(dtype) for dtype in vars(self).values()])

    @classmethod
    def from_codes(cls, codes: torch.Tensor) -> TrainingPrecision:
        return cls(*(CODES[int(code)] for code in codes))
