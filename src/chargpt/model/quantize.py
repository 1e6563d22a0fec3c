"""Int8 weights for faster inference on the CPU: `quantized(model, "int8")`.

Every `nn.Linear` of the GPT becomes an `Int8Linear`: its weight is stored as int8 with one
scale per output row (a quarter of the fp32 bytes, which a batch-1 decode step must read in full
for every character), and each input row is rounded to int8 with its own scale when it arrives
(dynamic quantization). The products of int8s are summed exactly in int32 by `torch._int_mm`
(VNNI instructions on recent x86 CPUs), then scaled back to floats. This is torchao's
"int8 dynamic activation, int8 weight" recipe, run eagerly on PyTorch's own kernel.

Embeddings, norms and attention stay in fp32, and an int8 model runs without autocast
(`chargpt.model.precision.forward_dtype`). A run directory always holds the fp32 weights:
models are quantized after loading, in memory, and never saved that way.
"""

from __future__ import annotations

import copy
import typing

import torch
from torch import nn

from chargpt.config import Quantize
from chargpt.errors import ChargptError
from chargpt.model.base import LanguageModel
from chargpt.model.bigram import BigramLanguageModel

METHODS = typing.get_args(Quantize)
INT8_MAX = 127
TINY = 1e-12  # floor of a scale: an all-zero row stays zeros instead of 0/0


class Int8Linear(nn.Module):
    """`nn.Linear` with symmetric int8 weights (a scale per output row) and int8 inputs (a
    scale per input row, chosen at run time). Inference only."""

    def __init__(self, linear: nn.Linear):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in fp32."""
        rows = x.reshape(-1, self.in_features).float()  # (N, in)
        # each row's own scale: its largest magnitude becomes 127
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(TINY) / INT8_MAX  # (N, 1)
        # a row holding inf or NaN has no scale: NaN makes all its outputs NaN, not garbage ints
        row_scale = torch.where(row_scale.isfinite(), row_scale, torch.nan)
        rows_int8 = (rows / row_scale).round_().to(torch.int8)  # (N, in)
        # exact int32 sums of int8 products, scaled back per row and per output: (N, out);
        # (in, out) as the transpose of the contiguous (out, in) is the layout that
        # `torch._int_mm` reads fastest for a few rows (each output's weights side by side)
        y = torch._int_mm(rows_int8, self.weight_int8.t()) * row_scale
        y.mul_(self.weight_scale)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, Int8Linear) for module in model.modules())


def quantized(model: LanguageModel, method: str) -> LanguageModel:
    """`model` in `method`'s form: itself for "none" or when it already is int8, else an int8
    copy (the caller's model is never changed). A one-line ChargptError where int8 cannot run."""
    if method not in METHODS:
        raise ChargptError(f"quantize must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "none" or is_quantized(model):
        return model
    check_int8_supported(model)
    model = copy.deepcopy(model)
    replace_linears(model)
    return model


def check_int8_supported(model: LanguageModel) -> None:
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
    try:
        probe = torch.ones(1, 8, dtype=torch.int8)
        torch._int_mm(probe, probe.t())
    except (AttributeError, RuntimeError, NotImplementedError) as err:
        raise ChargptError(
            f"this PyTorch ({torch.__version__}) has no int8 matrix product on the CPU "
            f"({str(err).splitlines()[0]}): "
            "upgrade torch or drop --quantize"
        ) from None


def replace_linears(module: nn.Module) -> None:
    """Swap every nn.Linear below `module` for an Int8Linear, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            replace_linears(child)
