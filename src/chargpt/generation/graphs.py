"""Decoding on a GPU as CUDA graphs: a static-shape step, captured once, replayed per character.

A small model on a GPU is bound by kernel launches and host round trips, not arithmetic: the
plain step of the lab-size GPT is about a hundred small kernels, each launched by Python, and
its shapes change with every position. `GraphDecoder` runs a step of fixed shapes instead:
the first `span` slots (a power of two covering the busy ones, or all slots), every one over
all block_size keys through a mask, with its new id, its position and whether it steps read
from preallocated device tensors, and the logits written in place. Nothing in it reads a value
back to the host, so `torch.cuda.CUDAGraph` captures it once per span when the decoder is
made, and each step is one copy of the inputs to the device and one graph replay. Sampling
stays on the device too (`sample_seeded`: no generator state, one set of operations for all
rows), so a step copies only the chosen ids back to the host.

Without CUDA, or when a capture fails, `graph_or_slot_decoder` says so in one line and returns
the plain `SlotDecoder`. On a CPU, `GraphDecoder(capture=False)` runs the same static step
eagerly: the math that the graphs replay, which the tests compare with the plain step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from chargpt.generation.decoders import SlotDecoder
from chargpt.generation.sampling import Controls, Generators, sample_seeded
from chargpt.model.cache import SlotStep

if TYPE_CHECKING:
    from chargpt.model.gpt import GPTLanguageModel

log = logging.getLogger("chargpt.generation")


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


class GraphDecoder(SlotDecoder):
    """`SlotDecoder` whose steps have static shapes (see the module docstring): on a GPU each
    `span` is a captured CUDA graph (`capture`); with capture=False the same step runs eagerly.
    Prefills and exact-mode recomputes stay eager (one per prompt or restart). Greedy ids are
    those of the plain step; sampled ones come from `sample_seeded` where each slot has its own
    generator (its seed is the generator's initial seed), so they differ from the plain path's."""

    def __init__(self, model: GPTLanguageModel, slots: int, capture: bool = True, **options: Any):
        """`options`: `SlotDecoder`'s (window_keep, dtype, deterministic, exact)."""
        super().__init__(model, slots, **options)
        device = self.next_logits.device
        # the step's inputs: each slot's new id, its position, 1 if it steps (else 0)
        self.inputs = torch.zeros(3, slots, dtype=torch.long, device=device)
        self.draws = [0] * slots  # ids each slot's sequence has drawn (sample_seeded's count)
        self.spans = spans_for(slots, self.deterministic)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self.capture()

    def capture(self) -> None:
        """A graph per span, recorded before any prefill (the warm-up runs write only into
        empty caches), under the autocast of the caches' dtype (the graph keeps its casts)."""
        check_cuda(self.next_logits.device)
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
        """The static step of the first `span` slots: every one over all block_size keys, at
        `inputs`' positions; the logits of the slots that step replace their old ones."""
        ids, positions, stepping = self.inputs[:, :span]  # (span,) each
        keys = self.window.block_size  # all of them: the same shapes at every position
        step = SlotStep(slice(0, span), positions, keys, self.n_head, keys)
        for cache in self.caches:
            cache.select(step)
        logits = self.model.step(ids[:, None], self.caches).float()  # (span, V)
        old = self.next_logits[:span]
        old.copy_(torch.where(stepping[:, None].bool(), logits, old))

    def step(self, next_ids: dict[int, int]) -> None:
        """One position for every slot in `next_ids`: the smallest span that covers them, run
        as its graph (or eagerly). The other slots of the span run on id 0 at their next free
        position (a full slot: its last, and it restarts before anything reads it) and keep
        their logits."""
        span = next(s for s in self.spans if s > max(next_ids))
        last = self.window.block_size - 1
        host = [
            [next_ids.get(slot, 0) for slot in range(span)],
            [min(self.lengths[slot], last) for slot in range(span)],
            [int(slot in next_ids) for slot in range(span)],
        ]
        self.inputs[:, :span].copy_(torch.tensor(host))  # one copy to the device per step
        if span in self.graphs:
            self.graphs[span].replay()
        else:
            self.run(span)
        for slot in next_ids:
            self.lengths[slot] += 1

    def start_batch(self, prompts: Mapping[int, Sequence[int]]) -> None:
        for slot in prompts:
            self.draws[slot] = 0
        super().start_batch(prompts)

    def choose(
        self, slots: Sequence[int], controls: Controls, generator: Generators
    ) -> torch.Tensor:
        """With a generator per slot: `sample_seeded` on the device, each slot's seed the
        initial seed of its generator and its count the ids drawn since its start; otherwise
        `sample_next`'s draw."""
        if generator is None or isinstance(generator, torch.Generator):
            return super().choose(slots, controls, generator)
        device = self.next_logits.device
        seeds = torch.tensor([g.initial_seed() for g in generator], device=device)
        counts = torch.tensor([self.draws[slot] for slot in slots], device=device)
        for slot in slots:
            self.draws[slot] += 1
        return sample_seeded(self.logits(slots), *controls, seeds, counts)


def graph_or_slot_decoder(
    model: GPTLanguageModel, slots: int, cuda_graphs: bool | None = None, **options: Any
) -> SlotDecoder:
    """A `GraphDecoder` where `cuda_graphs` asks for one (None: on a CUDA device) and it can be
    captured; else the plain `SlotDecoder`, with one line saying why when it was asked for.
    `options`: `SlotDecoder`'s."""
    device = next(model.parameters()).device
    if cuda_graphs if cuda_graphs is not None else device.type == "cuda":
        try:
            return GraphDecoder(model, slots, **options)
        except GraphUnavailable as why:
            log.warning("decoding without CUDA graphs (%s): the plain step instead", why)
    return SlotDecoder(model, slots, **options)
