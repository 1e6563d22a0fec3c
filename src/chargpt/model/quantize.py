"""Int8 weights for faster inference on the CPU: `quantized(model, "int8")`.

Every `nn.Linear` of the GPT becomes an `Int8Linear`: its weight is stored as int8 with one
scale per output row (a quarter of the fp32 bytes, which a batch-1 decode step must read in full
for every character), and its inputs are rounded to int8 when they arrive (dynamic
quantization). Two kernels multiply them, and each layer runs the one that is faster on this
machine for about the number of rows it is given (`fastest_kernel`: a short timing of the
model's largest layer, once per process and row count, never a reading of CPU flags):

- `int_mm`: each input row rounded with its own scale, the products of int8s summed exactly in
  int32 by `torch._int_mm`, then scaled back (torchao's "int8 dynamic activation, int8 weight"
  recipe, run eagerly on PyTorch's own kernel). Fast where the CPU multiplies int8s in hardware
  (VNNI); slower than fp32 on a CPU with AVX2 alone, many times so for many rows.
- `fbgemm`: PyTorch's dynamic-quantized linear (`torch.ops.quantized.linear_dynamic` on
  prepacked weights, the kernel behind `torch.ao.quantization.quantize_dynamic`), fast with AVX2
  alone. The same int8 weights; the inputs rounded to 7-bit unsigned ints with one scale and
  zero point for all the rows of a product (7 bits, so that AVX2's pairwise int16 sums cannot
  saturate), so that a row's numbers depend on the rows beside it. `ROW_INDEPENDENT` names the
  kernels free of that (serving with --deterministic keeps to them).

Embeddings, norms and attention stay in fp32, and an int8 model runs without autocast
(`chargpt.model.precision.forward_dtype`). A run directory always holds the fp32 weights:
models are quantized after loading, in memory, and never saved that way.
"""

from __future__ import annotations

import copy
import functools
import typing
import warnings
from collections.abc import Callable

import torch
from torch import nn

from chargpt.config import Quantize
from chargpt.errors import ChargptError
from chargpt.model.base import LanguageModel
from chargpt.model.bigram import BigramLanguageModel
from chargpt.model.timing import fastest_seconds

METHODS = typing.get_args(Quantize)
INT8_MAX = 127
TINY = 1e-12  # floor of a scale: an all-zero row stays zeros instead of 0/0


class Int8Linear(nn.Module):
    """`nn.Linear` with symmetric int8 weights (a scale per output row) and int8 inputs (chosen
    at run time), multiplied by the fastest of `kernels` here. Inference only. The kernel is the
    one timed fastest for a weight of `timed_shape` (in, out): the model's largest layer's when
    `quantized` makes it, so that one timing serves every layer; this layer's own by default."""

    def __init__(
        self,
        linear: nn.Linear,
        kernels: tuple[str, ...] | None = None,
        timed_shape: tuple[int, int] | None = None,
    ):
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        scale = weight.abs().amax(dim=1).clamp_min(TINY) / INT8_MAX  # (out,)
        # the weights stay parameters (frozen): counted, listed and saved as nn.Linear's are,
        # output rows first as in nn.Linear (the reference attention's state-dict hooks rely on it)
        weight_int8 = torch.round(weight / scale[:, None]).to(torch.int8)  # (out, in)
        self.weight_int8 = nn.Parameter(weight_int8, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernels = tuple(KERNELS) if kernels is None else kernels
        self.timed_shape = timed_shape or (self.in_features, self.out_features)
        self.kernel_by_rows: dict[int, str] = {}  # `fastest_kernel`'s answers, looked up cheaply
        # fbgemm's copy of the weights, made on first use; not state (weight_int8 is), and
        # dropped when a state dict is loaded into this layer
        self.packed: torch.ScriptObject | None = None
        self.register_load_state_dict_post_hook(forget_packed_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in fp32."""
        rows = x.numel() // self.in_features
        kernel = self.kernel_by_rows.get(rows) or self.choose_kernel(rows)
        return KERNELS[kernel](self, x.float())

    def choose_kernel(self, rows: int) -> str:
        """The kernel for products of `rows` rows: `fastest_kernel`'s choice, kept per layer (a
        decode step's forward pass makes every layer's products: the look-up must cost little)."""
        kernel = fastest_kernel(*self.timed_shape, probe_rows(rows), self.kernels)
        self.kernel_by_rows[rows] = kernel
        return kernel

    def packed_weights(self) -> torch.ScriptObject:
        """The weights as fbgemm's prepacked int8 matrix: the same int8 values and scales."""
        if self.packed is None:
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            weight = self.weight_int8.float() * self.weight_scale[:, None]  # rounds back exactly
            with warnings.catch_warnings():  # PyTorch deprecates its quantized tensor type
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch.quantize_per_channel(
                    weight, self.weight_scale, zero_points, 0, torch.qint8
                )
                self.packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        return self.packed


def forget_packed_weights(layer: Int8Linear, _incompatible_keys: object) -> None:
    layer.packed = None


def int_mm(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """(..., in) fp32 -> (..., out) by `torch._int_mm`, each row rounded with its own scale."""
    rows = x.reshape(-1, layer.in_features)  # (N, in)
    # each row's own scale: its largest magnitude becomes 127
    row_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(TINY) / INT8_MAX  # (N, 1)
    # a row holding inf or NaN has no scale: NaN makes all its outputs NaN, not garbage ints
    row_scale = torch.where(row_scale.isfinite(), row_scale, torch.nan)
    rows_int8 = (rows / row_scale).round_().to(torch.int8)  # (N, in)
    # exact int32 sums of int8 products, scaled back per row and per output: (N, out);
    # (in, out) as the transpose of the contiguous (out, in) is the layout that
    # `torch._int_mm` reads fastest for a few rows (each output's weights side by side)
    y = torch._int_mm(rows_int8, layer.weight_int8.t()) * row_scale
    y.mul_(layer.weight_scale)
    if layer.bias is not None:
        y += layer.bias
    return y.view(*x.shape[:-1], layer.out_features)


def fbgemm(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """(..., in) fp32 -> (..., out) by PyTorch's dynamic-quantized linear (bias included)."""
    y = torch.ops.quantized.linear_dynamic(x, layer.packed_weights(), True)  # 7-bit inputs
    # it rounds NaN to an int like any number: 0 x the inputs' sum makes every output NaN where
    # one input is NaN or inf (rows share one range here: an inf spoils them all anyway), and
    # adds nothing otherwise (one sum: a sum per row costs a decode step twice as much)
    return y.add_(x.sum(), alpha=0)


Kernel = Callable[[Int8Linear, torch.Tensor], torch.Tensor]
KERNELS: dict[str, Kernel] = {"int_mm": int_mm, "fbgemm": fbgemm}
ROW_INDEPENDENT = ("int_mm",)  # a row's outputs are the same bits whatever rows come with it


def probe_rows(rows: int) -> int:
    """The number of rows at which the kernel for a product of `rows` rows is chosen: decode
    steps of one sequence (1), a server's slots (16), prompts and scoring windows (64)."""
    return 1 if rows < 4 else 16 if rows < 32 else 64


@functools.cache
def fastest_kernel(in_features: int, out_features: int, rows: int, kernels: tuple[str, ...]) -> str:
    """The fastest of `kernels` that run here, for a product of `rows` rows by an
    (in_features, out_features) weight, timed once per process (`kernel_seconds`)."""
    usable = [kernel for kernel in kernels if kernel_error(kernel) is None]
    if len(usable) < 2:
        return (usable or list(kernels))[0]  # none runs: int8 was refused before any forward
    seconds = kernel_seconds(in_features, out_features, rows, usable)
    return min(seconds, key=seconds.__getitem__)


def kernel_seconds(
    in_features: int, out_features: int, rows: int, kernels: list[str]
) -> dict[str, float]:
    """Seconds of a product by each kernel on one thread, the least disturbed of interleaved
    repeats (milliseconds; a kernel that takes over 10 ms is timed once, as it cannot win)."""
    with torch.random.fork_rng(devices=[]):  # random weights, and the caller's draws unchanged
        torch.manual_seed(0)
        layer = Int8Linear(nn.Linear(in_features, out_features))
        x = torch.randn(rows, in_features)
    layer.packed_weights()  # set up before timing
    with torch.no_grad():
        jobs = {name: functools.partial(KERNELS[name], layer, x) for name in kernels}
        return fastest_seconds(jobs, repeats=7, warm_up=False, budget=0.01)


def kernel_error(name: str) -> str | None:
    """Why kernel `name` cannot run in this PyTorch build (one line), or None where it runs."""
    with torch.random.fork_rng(devices=[]):
        layer = Int8Linear(nn.Linear(8, 4))
    try:
        with torch.no_grad():
            KERNELS[name](layer, torch.ones(1, 8))
    except (AttributeError, RuntimeError, NotImplementedError) as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, Int8Linear) for module in model.modules())


def quantized(
    model: LanguageModel, method: str, kernels: tuple[str, ...] | None = None
) -> LanguageModel:
    """`model` in `method`'s form: itself for "none" or when it already is int8, else an int8
    copy (the caller's model is never changed) whose layers run the fastest of `kernels` (all of
    `KERNELS` by default). A one-line ChargptError where int8 cannot run."""
    if method not in METHODS:
        raise ChargptError(f"quantize must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "none" or is_quantized(model):
        return model
    kernels = tuple(KERNELS) if kernels is None else kernels
    check_int8_supported(model, kernels)
    model = copy.deepcopy(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    largest = max(linears, key=lambda linear: linear.weight.numel())
    replace_linears(model, kernels, (largest.in_features, largest.out_features))
    return model


def check_int8_supported(model: LanguageModel, kernels: tuple[str, ...]) -> None:
    if isinstance(model, BigramLanguageModel):
        raise ChargptError(
            "a bigram model is one table lookup, with no matrix product to run in int8: "
            "drop --quantize"
        )
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ChargptError(
            f"int8 weights run on the CPU only, not on {device.type}: use --device cpu "
            "or drop --quantize"
        )
    errors = {kernel: kernel_error(kernel) for kernel in kernels}
    if all(errors.values()):
        reasons = "; ".join(f"{kernel}: {error}" for kernel, error in errors.items())
        raise ChargptError(
            f"this PyTorch ({torch.__version__}) has no int8 matrix product on the CPU "
            f"({reasons}): upgrade torch or drop --quantize"
        )


def replace_linears(
    module: nn.Module, kernels: tuple[str, ...], timed_shape: tuple[int, int]
) -> None:
    """Swap every nn.Linear below `module` for an Int8Linear, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child, kernels, timed_shape))
        else:
            replace_linears(child, kernels, timed_shape)
