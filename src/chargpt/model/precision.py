"""Where a model runs and in which precision: the device, bf16 or fp32 by a measured matmul,
autocast, and the dtype of sampling and scoring passes. Training's own choices (the attention
dtype, Muon's) are in `chargpt.training.precision`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from functools import partial

import torch

from chargpt.errors import ChargptError
from chargpt.model.base import LanguageModel
from chargpt.model.quantize import is_quantized
from chargpt.model.timing import fastest_seconds

BOTH = (torch.float32, torch.bfloat16)
DTYPE_NAMES = {None: None, torch.float32: "fp32", torch.bfloat16: "bf16"}  # --dtype's names


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; explicit names must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ChargptError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ChargptError("device cuda requested but no CUDA GPU is available: use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ChargptError("device mps requested but MPS is not available: use --device cpu")
    return device


def matmul_seconds(size: int = 256, repeats: int = 3) -> dict[torch.dtype, float]:
    """Seconds of a (size x size) @ (size x size) product in fp32 and in bf16."""
    pairs = {dtype: torch.randn(size, size, dtype=dtype) for dtype in BOTH}
    return fastest_seconds({d: partial(torch.matmul, a, a) for d, a in pairs.items()}, repeats)


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU, measured once per
    process (tens of milliseconds). CPUs with AVX512-BF16 or AMX run bf16 faster; others (AVX2
    only, many ARM laptops, VMs that hide the instructions) emulate it, 10-100x slower. A
    measurement, not CPU flags: an emulated machine and a real one choose alike."""
    seconds = matmul_seconds()
    return seconds[torch.float32] / seconds[torch.bfloat16]


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls are at least as fast as fp32 ones on `device` (for the autocast of
    `--dtype auto` and Muon's orthogonalisation): on a GPU that supports bf16, or on a CPU
    where `cpu_bf16_speedup` measures so."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_speedup() >= 1.0


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training and inference: bf16 where it is fast, else fp32."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    return fastest_dtype(device)


def fastest_dtype(device: torch.device) -> torch.dtype:
    """bf16 where `bf16_is_fast`, else fp32."""
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights stay fp32) or nothing at all for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def tf32_matmuls(device: torch.device) -> Iterator[None]:
    """On a GPU, fp32 matmuls in TF32 (on Ampere and later, several times faster with a 10-bit
    mantissa) inside the block only: the setting is the caller's again afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def forward_dtype(model: LanguageModel, name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of `model`'s sampling and scoring passes: fp32 for an int8 model (its
    products are int8 already; autocast would only add casts around them) and for `auto` on a
    CPU (autocast casts every fp32 weight to bf16 again at each step: 6.9 against 4.1 ms per
    character at the lab size, batch 1, on a CPU with AVX512-BF16), else `resolve_dtype`'s."""
    if is_quantized(model) or (name == "auto" and device.type == "cpu"):
        return torch.float32
    return resolve_dtype(name, device)
