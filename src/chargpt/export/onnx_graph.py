"""A run as one ONNX graph that both reads a prompt and takes a decode step, with its KV cache
as inputs and outputs (onnx, onnxscript: the `export` extra).

    inputs:  ids (B, T) int64; past.{i}.key, past.{i}.value (B, n_head, P, hs) for each block i
    outputs: logits (B, T, vocab) float32; present.{i}.key, present.{i}.value (B, n_head, P+T, hs)

The T ids sit at positions P..P+T-1, after the P positions whose keys and values come in `past`.
A prefill passes P = 0 (empty pasts), a decode step T = 1 and the last step's presents as its
pasts; P + T must not exceed block_size (the decoders' window rule, `Window`, keeps it so). The
graph is the model's own forward loop (`GPTLanguageModel.logits` with caches), traced by
`torch.onnx.export(dynamo=True)`, attention translated as onnxruntime runs it fastest
(`attention`); the vocabulary and the model config ride in its metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from chargpt.config import ModelConfig
from chargpt.data.files import atomic_write
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.model.gpt import GPTLanguageModel
from chargpt.runs.directory import load_run

if TYPE_CHECKING:
    from onnxscript import ir

FORMAT = "chargpt-kv-1"  # the graph's inputs and outputs as this module's docstring describes
# metadata keys (ONNX metadata_props, strings)
FORMAT_KEY, CONFIG_KEY, VOCAB_KEY = "chargpt.format", "chargpt.model_config", "chargpt.tokenizer"
OPSET = 18


class GrowingCache:
    """The `AttentionCache` a traced graph can hold: the pasts come in as tensors, and each
    append returns past + new (the presents) instead of writing into a preallocated buffer."""

    def __init__(self, past_key: torch.Tensor, past_value: torch.Tensor):
        self.key, self.value = past_key, past_value  # (B, n_head, P, hs) each

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        past = self.key.shape[2]
        return torch.arange(past, past + T, device=device)  # (T,)

    def query_mask(self, T: int, device: torch.device) -> torch.Tensor:
        """(T, P + T): query i, at position P + i, sees the keys at positions <= P + i. Always a
        mask (never None), so that one graph serves every P and T."""
        past = self.key.shape[2]
        queries = torch.arange(T, device=device)[:, None] + past  # (T, 1)
        return torch.arange(past + T, device=device)[None, :] <= queries

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.key = torch.cat([self.key, k], dim=2)  # (B, n_head, P + T, hs)
        self.value = torch.cat([self.value, v], dim=2)
        return self.key, self.value


class KVGraph(nn.Module):
    """What is exported: (ids, pasts) -> (logits, presents), through the model's own loop."""

    def __init__(self, model: GPTLanguageModel):
        super().__init__()
        self.model = model

    def forward(
        self, ids: torch.Tensor, pasts: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        caches = [GrowingCache(pasts[2 * i], pasts[2 * i + 1]) for i in range(self.n_layer)]
        logits = self.model.logits(ids, caches)  # (B, T, V)
        return (logits, *(t for cache in caches for t in (cache.key, cache.value)))

    @property
    def n_layer(self) -> int:
        return len(self.model.blocks)


def input_names(n_layer: int) -> list[str]:
    return ["ids", *(f"past.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value"))]


def output_names(n_layer: int) -> list[str]:
    return ["logits", *(f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value"))]


def exportable(model_config: ModelConfig) -> ModelConfig:
    """The config the graph is traced from: the fused attention path (the reference path has the
    same weights but no KV cache), no dropout. A bigram cannot be exported."""
    if model_config.model != "gpt":
        raise ChargptError(
            f"export takes a GPT run, this one is a {model_config.model} (a lookup table, "
            "nothing to gain from ONNX): train a --model gpt run"
        )
    return dataclasses.replace(model_config, attention="fused", dropout=0.0)


def attention(
    query: ir.Value,
    key: ir.Value,
    value: ir.Value,
    attn_mask: ir.Value | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> ir.Value:
    """`F.scaled_dot_product_attention` as the graph computes it (an onnxscript translation of
    the aten op, for `GrowingCache`'s calls: a boolean mask, no dropout): softmax(q k^T / sqrt(hs)
    + mask) v, with k^T a Transpose that feeds the MatMul directly, which onnxruntime fuses into
    the product (torch's own translation reshapes around it: a copy of every cached key at every
    step) and the scale a scalar that it folds in. Masked scores are the dtype's lowest, not
    -inf: a row of queries always sees its own key, so no row is all masked."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("the exported attention takes a mask, no dropout, no GQA")
    head_size = query.shape[-1]
    factor = 1.0 / math.sqrt(head_size) if scale is None else scale
    scores = op.Mul(
        op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2])),
        op.Constant(value=ir.tensor(factor, dtype=query.dtype)),
    )  # (B, n_head, T, P + T)
    if attn_mask is not None:
        lowest = op.Constant(value=ir.tensor(query.dtype.min, dtype=query.dtype))
        scores = op.Where(attn_mask, scores, lowest)
    return op.MatMul(op.Softmax(scores, axis=-1), value)  # (B, n_head, T, hs)


def trace(model: GPTLanguageModel) -> torch.onnx.ONNXProgram:
    """The dynamo export, with batch, length and past length dynamic."""
    c = model.config
    n_layer, head_size = c.n_layer, c.n_embd // c.n_head
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("length", min=1, max=c.block_size)
    past = torch.export.Dim("past", min=0, max=c.block_size - 1)
    # example shapes other than 0 and 1, so that no dimension is taken for a constant
    ids = torch.zeros(2, 2, dtype=torch.long)
    pasts = tuple(torch.zeros(2, c.n_head, 3, head_size) for _ in range(2 * n_layer))
    shapes = ({0: batch, 1: length}, tuple({0: batch, 2: past} for _ in pasts))
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    with quiet_exporter():
        return torch.onnx.export(
            KVGraph(model).eval(),
            (ids, pasts),
            dynamo=True,
            input_names=input_names(n_layer),
            output_names=output_names(n_layer),
            dynamic_shapes=shapes,
            opset_version=OPSET,
            custom_translation_table={sdpa: attention},
            optimize=True,
            verbose=False,
        )


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's notes (no torchvision, deprecations, axis renames) are not the user's."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def metadata(model_config: ModelConfig, tokenizer: CharTokenizer) -> dict[str, str]:
    return {
        FORMAT_KEY: FORMAT,
        CONFIG_KEY: json.dumps(dataclasses.asdict(model_config)),
        VOCAB_KEY: json.dumps(tokenizer.to_dict()),
    }


def export_model(model: GPTLanguageModel, tokenizer: CharTokenizer, out: Path) -> None:
    """Write `model` as `out` (on the fused attention path, whichever it was trained on),
    checked by onnx.checker; `out` is whole or untouched."""
    import onnx

    model = fused_copy(model)
    with torch.no_grad():
        program = trace(model)
    proto = program.model_proto
    for key, value in metadata(model.config, tokenizer).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(out, lambda tmp: onnx.save_model(proto, str(tmp)))


def export_run(run_dir: Path, out: Path) -> None:
    """`chargpt export --format onnx`: the run's model as one ONNX file (module docstring)."""
    if out.suffix != ".onnx":
        raise ChargptError(f"--out {out}: name the file *.onnx")
    if not out.parent.is_dir():
        raise ChargptError(f"--out {out}: the directory {out.parent} does not exist: create it")
    run = load_run(run_dir, "cpu")
    exportable(run.model_config)  # a bigram fails here, before any tracing
    export_model(run.model, run.tokenizer, out)


def fused_copy(model: GPTLanguageModel) -> GPTLanguageModel:
    """`model` on the fused attention path, in eval mode, with the same weights."""
    if not isinstance(model, GPTLanguageModel):
        raise ChargptError("export takes a GPT (GPTLanguageModel), not a bigram")
    config = exportable(model.config)
    if config == model.config:
        return model.eval()
    copy = GPTLanguageModel(config, model.vocab_size)
    copy.load_state_dict(model.state_dict())
    return copy.eval()
