"""Choosing where and in which precision to run."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from chargpt.errors import ChargptError
from chargpt.model import CausalSelfAttention, LanguageModel
from chargpt.model.quantize import is_quantized

BOTH = (torch.float32, torch.bfloat16)
DTYPE_NAMES = {None: None, torch.float32: "fp32", torch.bfloat16: "bf16"}  # --dtype's names
CODES = tuple(DTYPE_NAMES)


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


def fastest_seconds(jobs: dict[torch.dtype, Callable[[], object]], repeats: int) -> dict:
    """The fastest of `repeats` runs of each dtype's job on one CPU thread (on a busy machine,
    threads that wait for each other would blur the comparison), taken in turns after one
    untimed run each (which sets the kernels up)."""
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in jobs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in jobs.values():
            job()
        for _ in range(repeats):
            for dtype, job in jobs.items():
                start = time.perf_counter()
                job()
                times[dtype].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {dtype: min(seconds) for dtype, seconds in times.items()}


def matmul_seconds(size: int = 256, repeats: int = 3) -> dict[torch.dtype, float]:
    """Seconds of a (size x size) @ (size x size) product in fp32 and in bf16."""
    pairs = {dtype: torch.randn(size, size, dtype=dtype) for dtype in BOTH}
    return fastest_seconds({d: partial(torch.matmul, a, a) for d, a in pairs.items()}, repeats)


def attention_seconds(shape: tuple[int, ...] = (8, 4, 64, 32), repeats: int = 3) -> dict:
    """Seconds of causal attention's forward and backward passes over (B, n_head, T, hs)
    queries, keys and values in fp32 and in bf16."""

    def forward_backward(dtype: torch.dtype) -> Callable[[], None]:
        q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return fastest_seconds({dtype: forward_backward(dtype) for dtype in BOTH}, repeats)


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on this CPU, measured once per
    process (tens of milliseconds). CPUs with AVX512-BF16 or AMX run bf16 faster; others (AVX2
    only, many ARM laptops, VMs that hide the instructions) emulate it, 10-100x slower. A
    measurement, not CPU flags: an emulated machine and a real one choose alike."""
    seconds = matmul_seconds()
    return seconds[torch.float32] / seconds[torch.bfloat16]


@functools.cache
def cpu_bf16_attention_speedup() -> float:
    """The same for training's fused attention, measured once per process: on CPUs where bf16
    matmuls are fast, its bf16 backward pass can still be 2-3x slower than fp32's."""
    seconds = attention_seconds()
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


@dataclasses.dataclass(frozen=True)
class TrainingPrecision:
    """The dtypes of one training run, decided once at its start (measured, for `--dtype auto`)
    and saved with it: a resumed run, and every process of a multi-process one, computes in the
    same dtypes, although each process's timings differ and may fall either side of a choice."""

    autocast: torch.dtype  # the projections' (fp32: no autocast)
    attention: torch.dtype | None  # the fused attention's; None: its inputs'
    newton_schulz: torch.dtype  # Muon's orthogonalisation

    def __post_init__(self) -> None:
        if self.autocast not in BOTH or self.newton_schulz not in BOTH:
            raise ValueError(f"no training precision: {self}")

    @classmethod
    def measured(cls, name: str, device: torch.device) -> TrainingPrecision:
        """`name`'s autocast (see resolve_dtype); attention in fp32 under bf16 autocast on a
        CPU where bf16's fused attention is measured slower (its backward pass); Newton-Schulz
        in bf16 where bf16 matmuls are fast."""
        autocast = resolve_dtype(name, device)
        slow = autocast == torch.bfloat16 and device.type == "cpu"
        slow = slow and cpu_bf16_attention_speedup() < 1
        return cls(autocast, torch.float32 if slow else None, fastest_dtype(device))

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
