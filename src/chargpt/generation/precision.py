"""Choosing where and in which precision to run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from chargpt.errors import ChargptError
from chargpt.model import LanguageModel
from chargpt.model.quantize import is_quantized


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


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast only on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated
    (measured on an AVX2-only EPYC: 0.3 GFLOP/s in bf16 against 150 in fp32)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training and inference: bf16 where it is fast, else fp32."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


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
