"""Where a model runs and in which precision: the device, the autocast dtype by a measured
matmul (bf16 where the device runs it natively, else fp16 where that is fast, else fp32), and the
dtype of sampling and scoring passes. Training's own choices (the attention dtype, Muon's, the
gradient scaler) are in `chargpt.training.precision`."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from functools import partial

import torch

from chargpt.errors import ChargptError
from chargpt.model.base import LanguageModel
from chargpt.model.quantize import is_quantized
from chargpt.model.timing import fastest_seconds

CPU = torch.device("cpu")
BOTH = (torch.float32, torch.bfloat16)  # what a CPU's probe times
PROBED = (*BOTH, torch.float16)  # what a GPU's probe times
# --dtype's names
DTYPE_NAMES = {None: None, torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# a GPU's probe multiplies matrices this large, so that its matrix units are busy rather than
# waiting for launches (a few milliseconds each on a T4, well under one on an H200)
GPU_PROBE_SIZE = 4096
# native bf16 runs at about fp16's speed (the same matrix units); emulated bf16 (compute
# capability below 8.0: T4, V100) is several times slower than fp16
NATIVE_BF16_MARGIN = 1.5


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


def matmul_seconds(
    size: int = 256,
    repeats: int = 3,
    device: torch.device = CPU,
    dtypes: tuple[torch.dtype, ...] = BOTH,
) -> dict[torch.dtype, float]:
    """Seconds of a (size x size) @ (size x size) product on `device` in each of `dtypes`."""
    matrices = {dtype: torch.randn(size, size, device=device).to(dtype) for dtype in dtypes}
    jobs = {dtype: partial(torch.matmul, a, a) for dtype, a in matrices.items()}
    return fastest_seconds(jobs, repeats, device=device)


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU, measured once per
    process (tens of milliseconds). CPUs with AVX512-BF16 or AMX run bf16 faster; others (AVX2
    only, many ARM laptops, VMs that hide the instructions) emulate it, 10-100x slower. A
    measurement, not CPU flags: an emulated machine and a real one choose alike."""
    seconds = matmul_seconds()
    return seconds[torch.float32] / seconds[torch.bfloat16]


@functools.cache
def gpu_matmul_seconds(device: torch.device) -> dict[torch.dtype, float]:
    """Seconds of a large matmul in fp32, bf16 and fp16 on this GPU (the one given, not the
    current one), measured once per process and GPU. torch.cuda.is_bf16_supported() answers
    True where bf16 is only emulated; a timing does not."""
    return matmul_seconds(GPU_PROBE_SIZE, 3, device, PROBED)


def probe_seconds(device: torch.device) -> dict[torch.dtype, float]:
    """The matmul timings behind `fastest_dtype` on `device`, relative to fp32's (1.0): a CPU's
    bf16 (CPUs that run fp16 natively run bf16 natively too, and fp16 training would need a
    gradient scaler that bf16 does not), a CUDA GPU's bf16 and fp16; nothing elsewhere."""
    if device.type == "cpu":
        return {torch.float32: 1.0, torch.bfloat16: 1.0 / cpu_bf16_speedup()}
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        seconds = gpu_matmul_seconds(torch.device("cuda", index))
        return {dtype: value / seconds[torch.float32] for dtype, value in seconds.items()}
    return {torch.float32: 1.0}


def choose_dtype(seconds: dict[torch.dtype, float]) -> torch.dtype:
    """From the probe's timings: bf16 where it runs natively (no slower than fp32, and about as
    fast as fp16 where fp16 was timed), else fp16 where it beats fp32, else fp32. Never emulated
    bf16."""
    fp32, bf16, fp16 = (seconds.get(dtype, math.inf) for dtype in PROBED)
    if bf16 <= fp32 and bf16 <= NATIVE_BF16_MARGIN * fp16:
        return torch.bfloat16
    if fp16 < fp32:
        return torch.float16
    return torch.float32


def fastest_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of `--dtype auto` on `device`, by measurement (see choose_dtype)."""
    return choose_dtype(probe_seconds(device))


def bf16_is_fast(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively, as measured (Muon's orthogonalisation runs in bf16
    there, else in fp32)."""
    return fastest_dtype(device) == torch.bfloat16


def describe_probe(device: torch.device) -> str:
    """What the probe measured on `device`, for a run's header ("" where nothing was timed)."""
    if device.type == "cpu":
        return f"a bf16 matmul measured {cpu_bf16_speedup():.2g}x fp32's speed here"
    seconds = probe_seconds(device)
    speeds = [f"{DTYPE_NAMES[d]} {1 / seconds[d]:.2g}x" for d in PROBED[1:] if d in seconds]
    return f"matmuls measured {', '.join(speeds)} fp32's speed here" if speeds else ""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for training and inference: the one named, or for `auto` the
    fastest measured on `device` (see fastest_dtype)."""
    names = {name: dtype for dtype, name in DTYPE_NAMES.items() if dtype is not None}
    if name in names:
        return names[name]
    return fastest_dtype(device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast (weights stay fp32), or nothing at all for fp32."""
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
    CPU (autocast casts every fp32 weight to bf16 again at each step, which costs more than
    bf16 saves at a decode step's few rows; docs/generation.md), else `resolve_dtype`'s (on a
    GPU that emulates bf16, fp16)."""
    if is_quantized(model) or (name == "auto" and device.type == "cpu"):
        return torch.float32
    return resolve_dtype(name, device)
