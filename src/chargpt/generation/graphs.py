"""Decoding on a GPU as CUDA graphs: a static-shape step, captured once, replayed per character.

A small model on a GPU is bound by kernel launches and host round trips, not arithmetic: the
plain step of the lab-size GPT is about a hundred small kernels, each launched by Python, and
its shapes change with every position. `StaticStep` (what `decoders.GraphDecoder` steps with)
runs a step of fixed shapes instead:
the first `span` slots (a power of two covering the busy ones, or all slots), every one over
all block_size keys through a mask, with its new id, its position and whether it steps read
from preallocated device tensors, and the logits written in place. Nothing in it reads a value
back to the host, so `torch.cuda.CUDAGraph` captures it once per span when the decoder is
made, and each step is one copy of the inputs to the device and one graph replay. Sampling
stays on the device too (`sample_seeded`: no generator state, one set of operations for all
rows), so a step copies only the chosen ids back to the host.

Without CUDA, or when a capture fails, `StaticStep` raises `GraphUnavailable`, and
`decoders.graph_or_slot_decoder` says so in one line and returns the plain `SlotDecoder`. On a
CPU, `StaticStep(capture=False)` runs the same step eagerly: the math that the graphs replay,
which the tests compare with the plain step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from chargpt.model.cache import SlotKVCache, SlotStep

if TYPE_CHECKING:
    from chargpt.model.gpt import GPTLanguageModel


class GraphUnavailable(Exception):
    """Why the step cannot run as a CUDA graph here (no CUDA device, a failed capture)."""


def spans_for(slots: int, deterministic: bool) -> list[int]:
    """The numbers of leading slots a step may run: powers of two up to `slots`, and `slots`
    (a step runs the smallest that covers the busy slots); only `slots` when deterministic, so
    that every step has the same shapes."""
    if deterministic:
        return [slots]
    return sorted({*(2**i for i in range(slots.bit_length()) if 2**i < slots), slots})


def check_cuda(device: torch.device) -> None:
    """A graph records CUDA work only: anywhere else it would replay nothing."""
    if device.type != "cuda":
        raise GraphUnavailable(f"CUDA graphs need a CUDA device, not {device.type}")


def capture_graph(run: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """`run` (which touches only preallocated tensors) recorded as a CUDA graph, after warm-up
    runs on a side stream, as PyTorch's CUDA-graph recipe does."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


class StaticStep:
    """One decode position for the first `span` slots of `caches`, each over all block_size
    keys, with shapes that never change: the step a CUDA graph captures (one graph per span,
    made here when `capture`; without, the same step runs eagerly). Inputs and outputs are
    preallocated: `inputs` holds each slot's new id, its position and whether it steps; the
    logits of the slots that step replace theirs in `logits` in place."""

    def __init__(
        self,
        model: GPTLanguageModel,
        caches: Sequence[SlotKVCache],
        logits: torch.Tensor,
        deterministic: bool,
        capture: bool,
    ):
        self.model, self.caches, self.logits = model, caches, logits  # logits: (slots, V)
        self.slots, self.n_head, self.keys = caches[0].k.shape[:3]
        self.inputs = torch.zeros(3, self.slots, dtype=torch.long, device=logits.device)
        self.spans = spans_for(self.slots, deterministic)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self.capture()

    def capture(self) -> None:
        """A graph per span, recorded before any prefill (the warm-up runs write only into
        empty caches), under the autocast of the caches' dtype (the graph keeps its casts)."""
        check_cuda(self.logits.device)
        cache_dtype = self.caches[0].k.dtype
        bf16 = cache_dtype != next(self.model.parameters()).dtype
        try:
            with torch.inference_mode(), torch.autocast("cuda", cache_dtype, enabled=bf16):
                for span in self.spans:
                    self.graphs[span] = capture_graph(lambda span=span: self.run(span))
        except Exception as err:  # whatever stops a capture, the plain step runs instead
            text = str(err).strip().splitlines()
            raise GraphUnavailable(text[0] if text else type(err).__name__) from err

    def run(self, span: int) -> None:
        """The step of the first `span` slots, from `inputs` to `logits`; nothing is read back
        to the host."""
        ids, positions, stepping = self.inputs[:, :span]  # (span,) each
        step = SlotStep(slice(0, span), positions, self.keys, self.n_head, self.keys)
        for cache in self.caches:
            cache.select(step)
        logits = self.model.step(ids[:, None], self.caches).float()  # (span, V)
        old = self.logits[:span]
        old.copy_(torch.where(stepping[:, None].bool(), logits, old))

    def __call__(self, next_ids: Mapping[int, int], lengths: Sequence[int]) -> None:
        """One position for every slot in `next_ids` (slot -> id) after its `lengths` cached
        ones: the smallest span that covers them, replayed (or run). The other slots of the
        span run on id 0 at their next free position (a full slot: its last, and it restarts
        before anything reads it) and keep their logits."""
        span = next(s for s in self.spans if s > max(next_ids))
        last = self.keys - 1
        host = [
            [next_ids.get(slot, 0) for slot in range(span)],
            [min(lengths[slot], last) for slot in range(span)],
            [int(slot in next_ids) for slot in range(span)],
        ]
        self.inputs[:, :span].copy_(torch.tensor(host))  # one copy to the device per step
        if span in self.graphs:
            self.graphs[span].replay()
        else:
            self.run(span)
