"""Decoding: next-character logits for growing sequences, through one interface.

`Decoder` is that interface. Sequences live in numbered slots: `start` reads a sequence's
prompt into a free slot, `logits` gives the next-character logits of any busy slots, `choose`
draws their next ids, `append` extends any set of slots by their chosen ids (one forward pass
for all of them where the back end can) and `free` ends a sequence. Every command that
continues text goes through it: `chargpt sample` (`Rows`: a batch of samples in slots
0..B-1, stepping together), `chargpt serve` (continuous batching: sequences start and end
between steps, each at its own position) and the onnxruntime backend. The back ends differ
behind it:

* `SlotDecoder`: the fused GPT in PyTorch, a KV cache per slot (`chargpt.model.cache`): rows at
  one position take the lean step, rows at different positions a masked one;
* `GraphDecoder`: the same with static shapes, captured as CUDA graphs on a GPU
  (`chargpt.generation.graphs`);
* `LoopDecoder`: the lab's loop, for the bigram and the `reference` attention (no cache);
* `OnnxDecoder` (`chargpt.export.runtime`): the exported graph in onnxruntime.

Past block_size, every back end with a cache follows the one `Window` rule, applied here in
`Decoder.append`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from chargpt.generation.graphs import GraphUnavailable, StaticStep
from chargpt.generation.sampling import Controls, Generators, sample_next, sample_seeded
from chargpt.model.cache import KVCache, SlotKVCache, SlotStep

if TYPE_CHECKING:
    from chargpt.model.base import LanguageModel
    from chargpt.model.gpt import GPTLanguageModel

log = logging.getLogger("chargpt.generation")
KEY_BUCKET = 32  # SlotDecoder's masked steps read keys in multiples of this many positions


def window_length(block_size: int, window_keep: float) -> int:
    """How many of the latest ids a full cache restarts from in window mode: in [1, block_size),
    so that a restart leaves room for at least one more position; 1 when block_size is 1 (a
    cache of one position holds the newest id alone, and restarts from it at every id)."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    return max(1, min(int(window_keep * block_size), block_size - 1))


Ids = TypeVar("Ids", list[int], torch.Tensor)


def latest(ids: Ids, n: int) -> Ids:
    """The last n >= 1 ids of a list, or of each row of a (B, T) tensor."""
    return ids[-n:] if isinstance(ids, list) else ids[:, -n:]


@dataclass(frozen=True)
class Window:
    """The window rule past block_size, which every cached decoder follows.

    Positions are learned absolute embeddings, so once a sequence outgrows block_size every
    cached key sits at the wrong position: a cache cannot slide. While a cache `has_room`, each
    new id is one more position; when it is full, the sequence `restart`s from its latest `keep`
    ids, read again from position 0 (one prefill per block_size - keep + 1 ids), so that every
    id still sees at least `keep` earlier ones (docs/generation.md, "Past block_size")."""

    block_size: int
    keep: int  # `window_length`'s

    def __post_init__(self) -> None:
        if not 1 <= self.keep <= max(1, self.block_size - 1):
            raise ValueError(f"keep must be in [1, block_size), got {self.keep}")

    @classmethod
    def of(cls, block_size: int, window_keep: float) -> Window:
        return cls(block_size, window_length(block_size, window_keep))

    def has_room(self, cached: int) -> bool:
        """Whether a cache that holds `cached` positions takes one more."""
        return cached < self.block_size

    def context(self, ids: Ids) -> Ids:
        """The latest block_size ids: all that the next id depends on."""
        return latest(ids, self.block_size)

    def restart(self, ids: Ids) -> Ids:
        """The latest `keep` ids, which a full cache restarts from."""
        return latest(ids, self.keep)


class Decoder:
    """The decoding interface, and what every back end shares: each slot's latest ids, how
    many positions its cache holds, its next-token logits, and the `Window` rule.

    A back end says whether a slot's cache `has_room` and implements three passes: `prefill`
    (read slots' ids into their caches from position 0), `step` (one new position for each of
    some slots, every one with room) and `recompute` (the logits of slots' ids read whole,
    without the cache: `exact` mode once a cache is full, and the lab's loop for every id).
    Slots that start or restart together with as many ids, in consecutive slots, are read in
    one pass (a batch of samples reads its prompt as one batch); with `deterministic`, each
    alone, so that no slot's numbers depend on another's."""

    def __init__(
        self,
        slots: int,
        window: Window,
        vocab_size: int,
        device: torch.device,
        exact: bool = False,
        deterministic: bool = False,
    ):
        self.slots = slots
        self.window = window
        self.exact = exact  # full caches: recompute the last block_size ids for every new id
        self.deterministic = deterministic
        self.ids: list[list[int]] = [[] for _ in range(slots)]  # each slot's last block_size
        self.lengths = [0] * slots  # positions cached in each slot
        # (slots, V): the next-token logits of each busy slot
        self.next_logits = torch.zeros(slots, vocab_size, device=device)

    # --- the interface

    def start(self, slot: int, ids: Sequence[int]) -> None:
        """Begin a sequence in `slot` (a free one) from `ids`: read its latest block_size."""
        self.start_batch({slot: ids})

    def start_batch(self, prompts: Mapping[int, Sequence[int]]) -> None:
        """Begin a sequence in each slot of `prompts` (slot -> its ids)."""
        for slot, ids in prompts.items():
            if not ids:
                raise ValueError("a sequence starts from at least one id")
            self.ids[slot] = self.window.context(list(ids))
        self.read(list(prompts), self.prefill)

    def logits(self, slots: Sequence[int]) -> torch.Tensor:
        """(R, V): the next-token logits of each of `slots`, in fp32 (a copy)."""
        return self.next_logits[list(slots)]

    def choose(
        self, slots: Sequence[int], controls: Controls, generator: Generators
    ) -> torch.Tensor:
        """The next id of each of `slots`, drawn from its logits as `sample_next` draws
        (`generator`: one per slot, or one for all): (R, 1), on the logits' device."""
        return sample_next(self.logits(slots), *controls, generator)

    def append(self, next_ids: Mapping[int, int]) -> None:
        """Extend each slot in `next_ids` by its id and compute its next logits; other slots
        keep their place. Slots whose cache has room take one more position, in one `step`; a
        full one restarts from its latest ids (`Window`), or in `exact` mode is recomputed."""
        stepping, full = {}, []
        for slot, token in next_ids.items():
            self.ids[slot] = self.window.context(self.ids[slot] + [token])
            if self.has_room(slot):
                stepping[slot] = token
            else:
                full.append(slot)
        if stepping:
            self.step(stepping)
        if full and self.exact:
            self.read(full, self.recompute)
        elif full:
            for slot in full:
                self.ids[slot] = self.window.restart(self.ids[slot])
            self.read(full, self.prefill)

    def free(self, slot: int) -> None:
        """End the sequence in `slot` (nothing if it holds none)."""
        self.ids[slot], self.lengths[slot] = [], 0

    # --- shared by the back ends

    def read(self, slots: list[int], run: Callable[[list[int]], None]) -> None:
        """`run` (prefill or recompute) over `slots`, one pass per batch of them (`batches`)."""
        for batch in self.batches(slots):
            run(batch)

    def batches(self, slots: list[int]) -> Iterator[list[int]]:
        """`slots` in runs of consecutive slots holding as many ids (each alone when
        deterministic): the rows of one (R, T) pass, written to one span of the caches."""
        run: list[int] = []
        for slot in sorted(slots):
            joins = run and slot == run[-1] + 1 and len(self.ids[slot]) == len(self.ids[run[0]])
            if run and (self.deterministic or not joins):
                yield run
                run = []
            run.append(slot)
        if run:
            yield run

    def id_rows(self, slots: Sequence[int]) -> torch.Tensor:
        """(R, T): the ids of `slots`, which hold as many, on the logits' device."""
        return torch.tensor([self.ids[slot] for slot in slots], device=self.next_logits.device)

    def set_logits(self, slots: Sequence[int], logits: torch.Tensor) -> None:
        """Store (R, V) next-token logits of `slots` (consecutive ones as one span)."""
        logits = logits.to(self.next_logits.dtype)
        if list(slots) == list(range(slots[0], slots[0] + len(slots))):
            self.next_logits[slots[0] : slots[0] + len(slots)] = logits
        else:
            self.next_logits[list(slots)] = logits

    # --- the back end's part

    def has_room(self, slot: int) -> bool:
        return self.window.has_room(self.lengths[slot])

    def prefill(self, slots: list[int]) -> None:
        raise NotImplementedError

    def recompute(self, slots: list[int]) -> None:
        raise NotImplementedError

    def step(self, next_ids: dict[int, int]) -> None:
        raise NotImplementedError


class LoopDecoder(Decoder):
    """The lab's loop: every new id re-runs the model on the slot's last `context_length` ids
    (no cache), so a bigram (context 1) costs O(1) per id. The bigram and the `reference`
    attention decode this way, and so does any model without `kv_cache`."""

    def __init__(self, model: LanguageModel, slots: int, deterministic: bool = False):
        device = next(model.parameters()).device
        window = Window.of(model.context_length, 0.5)  # its context only: nothing is cached
        super().__init__(slots, window, model.vocab_size, device, True, deterministic)
        self.model = model

    def has_room(self, slot: int) -> bool:
        return False  # no cache: every id is a full pass

    def prefill(self, slots: list[int]) -> None:
        self.recompute(slots)

    def recompute(self, slots: list[int]) -> None:
        # (R, <= context) ids -> (R, V): only the last position matters
        self.set_logits(slots, self.model.logits(self.id_rows(slots))[:, -1])


def activation_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the model's keys and values come out in: autocast's where this thread has it
    on for `device`, else the parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


class SlotDecoder(Decoder):
    """The fused GPT in PyTorch: a `SlotKVCache` per block holds every slot's keys and values.

    Prompts and restarts are prefilled from position 0 (`batches`). A step runs the span of
    slots from the first to the last one stepping. Where every slot of the span steps at one
    position (a batch of samples, or one sequence), it is the lean step over exactly the cached
    keys, no mask (`GPTLanguageModel.step` on `KVCache` views of the slots). Otherwise each row
    reads the keys up to the longest of them, rounded up to a multiple of KEY_BUCKET (so that
    few shapes ever run), through a mask that hides each row's keys past its own (`step_shape`);
    then a row's numbers can depend on the others in the last bits (a CPU's matrix product may
    round differently for a different number of rows). With `deterministic`, every step runs
    all slots over all block_size keys: the shapes, and with them the order of every
    floating-point sum, are the same whatever the batch holds, so a row's logits depend on its
    own sequence alone, bit for bit."""

    def __init__(
        self,
        model: GPTLanguageModel,
        slots: int,
        window_keep: float = 0.5,
        dtype: torch.dtype | None = None,
        deterministic: bool = False,
        exact: bool = False,
    ):
        if not model.supports_kv_cache:
            raise ValueError("SlotDecoder needs the fused attention path (a KV cache)")
        c = model.config
        device = next(model.parameters()).device
        window = Window.of(c.block_size, window_keep)
        super().__init__(slots, window, model.vocab_size, device, exact, deterministic)
        self.model = model
        self.n_head = c.n_head
        shape = (slots, c.n_head, c.block_size, c.n_embd // c.n_head)
        dtype = dtype or activation_dtype(model, device)  # the forward passes' (bf16 autocast)
        self.caches = [SlotKVCache(*shape, device, dtype) for _ in model.blocks]
        # a span of slots as one KVCache per block, made once: the lean step's views
        self.views: dict[range, list[KVCache]] = {}

    def prefill(self, slots: list[int]) -> None:
        """Fill consecutive `slots` with the keys and values of their ids, from position 0."""
        idx = self.id_rows(slots)  # (R, T)
        caches = [cache.rows(slots[0], slots[-1] + 1) for cache in self.caches]
        self.set_logits(slots, self.model.logits(idx, caches)[:, -1])  # (R, V)
        for slot in slots:
            self.lengths[slot] = idx.shape[1]

    def recompute(self, slots: list[int]) -> None:
        # (R, block_size) ids read whole, no cache: the lab's meaning past block_size
        self.set_logits(slots, self.model.logits(self.id_rows(slots))[:, -1])

    def lockstep(self, next_ids: Mapping[int, int]) -> bool:
        """Whether every slot from the first to the last in `next_ids` steps, all at one
        position (and not deterministic): then the lean step runs them."""
        first, last = min(next_ids), max(next_ids)
        length = self.lengths[first]
        return not self.deterministic and all(
            slot in next_ids and self.lengths[slot] == length for slot in range(first, last + 1)
        )

    def step_shape(self, next_ids: Mapping[int, int]) -> tuple[slice, int]:
        """The slots and the keys that a masked step for `next_ids` reads: all of both when
        deterministic; else from the first to the last slot stepping (sequences kept in the
        lowest free slots keep this span short) over the positions up to the longest one's new
        position, rounded up to a multiple of KEY_BUCKET (so that few shapes ever run)."""
        if self.deterministic:
            return slice(0, self.slots), self.window.block_size
        # keys the newest position sees: at most block_size, as every stepping slot has room
        longest = max(self.lengths[slot] for slot in next_ids) + 1
        keys = min(self.window.block_size, -(-longest // KEY_BUCKET) * KEY_BUCKET)
        return slice(min(next_ids), max(next_ids) + 1), keys

    def step(self, next_ids: dict[int, int]) -> None:
        """One position for every slot in `next_ids`, in one forward pass. In a masked step
        the other slots of the span run too, on id 0 at their next free position (a full
        slot: its last, and it restarts before anything reads it)."""
        device = self.next_logits.device
        if self.lockstep(next_ids):
            first, last = min(next_ids), max(next_ids)
            ids = torch.tensor([[next_ids[s]] for s in range(first, last + 1)], device=device)
            span = range(first, last + 1)
            if span not in self.views:
                self.views[span] = [cache.rows(first, last + 1) for cache in self.caches]
            caches = self.views[span]
            for cache in caches:
                cache.length = self.lengths[first]
            self.set_logits(span, self.model.step(ids, caches))  # (R, V)
        else:
            rows, keys = self.step_shape(next_ids)
            span = range(rows.start, rows.stop)
            last = self.window.block_size - 1
            host = torch.tensor(
                [[next_ids.get(s, 0) for s in span], [min(self.lengths[s], last) for s in span]]
            )
            ids, positions = host.to(device)  # (R,) each: one copy for both
            step = SlotStep(rows, positions, keys, self.n_head, self.window.block_size)
            for cache in self.caches:
                cache.select(step)
            logits = self.model.step(ids[:, None], self.caches)  # (R, V)
            stepped = sorted(next_ids)
            if len(stepped) < len(span):  # the rows of the slots that stepped
                logits = logits[[slot - rows.start for slot in stepped]]
            self.set_logits(stepped, logits)
        for slot in next_ids:
            self.lengths[slot] += 1


class GraphDecoder(SlotDecoder):
    """`SlotDecoder` whose steps have static shapes (`chargpt.generation.graphs.StaticStep`):
    on a GPU each is a captured CUDA graph; with capture=False the same step runs eagerly.
    Prefills and exact-mode recomputes stay eager (one per prompt or restart). Greedy ids are
    those of the plain step; sampled ones come from `sample_seeded` on the device where each
    slot has its own generator (its seed is the generator's initial seed), so they differ from
    the plain path's draws. Raises `GraphUnavailable` where a capture cannot be made."""

    def __init__(self, model: GPTLanguageModel, slots: int, capture: bool = True, **options: Any):
        """`options`: `SlotDecoder`'s (window_keep, dtype, deterministic, exact)."""
        super().__init__(model, slots, **options)
        self.static = StaticStep(model, self.caches, self.next_logits, self.deterministic, capture)
        self.draws = [0] * slots  # ids each slot's sequence has drawn (sample_seeded's count)

    def step(self, next_ids: dict[int, int]) -> None:
        self.static(next_ids, self.lengths)
        for slot in next_ids:
            self.lengths[slot] += 1

    def start_batch(self, prompts: Mapping[int, Sequence[int]]) -> None:
        for slot in prompts:
            self.draws[slot] = 0
        super().start_batch(prompts)

    def choose(
        self, slots: Sequence[int], controls: Controls, generator: Generators
    ) -> torch.Tensor:
        """With a generator per slot: `sample_seeded`, each slot's seed the initial seed of its
        generator and its count the ids it drew since its start; else `sample_next`'s draw."""
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
    if device.type == "cuda" if cuda_graphs is None else cuda_graphs:
        try:
            return GraphDecoder(model, slots, **options)
        except GraphUnavailable as why:
            log.warning("decoding without CUDA graphs (%s): the plain step instead", why)
    return SlotDecoder(model, slots, **options)


class Rows:
    """A (B, T) batch of prompts decoded together in slots 0..B-1 of a `Decoder`, as tensors:
    `logits` (B, V), `choose` (B, 1) ids, `append` (B, 1) ids. What `chargpt sample` runs."""

    def __init__(self, decoder: Decoder, idx: torch.Tensor):
        self.decoder = decoder
        self.slots = list(range(idx.shape[0]))
        decoder.start_batch(dict(enumerate(idx.tolist())))  # reads the prompts

    @property
    def logits(self) -> torch.Tensor:
        return self.decoder.logits(self.slots)  # (B, V)

    def choose(self, controls: Controls, generator: Generators) -> torch.Tensor:
        return self.decoder.choose(self.slots, controls, generator)  # (B, 1)

    def append(self, idx_next: torch.Tensor) -> None:
        """Extend every row by its (B, 1) next id and compute the following logits."""
        self.decoder.append(dict(enumerate(idx_next[:, 0].tolist())))


def new_decoder(
    model: LanguageModel,
    slots: int,
    kv_cache: bool = True,
    long_context: str = "window",
    window_keep: float = 0.5,
    dtype: torch.dtype | None = None,
    deterministic: bool = False,
    cuda_graphs: bool | None = None,
) -> Decoder:
    """A decoder of `slots` sequences for `model`: a KV cache per slot where the model has one
    (the fused GPT), as CUDA graphs on a GPU (`cuda_graphs`: None on CUDA devices only, or
    True/False), the lab's loop otherwise. `long_context` and `window_keep` say what a full
    cache does past block_size; `dtype`: the caches' (default: the forward passes')."""
    if long_context not in ("window", "exact"):
        raise ValueError(f"long_context must be 'window' or 'exact', got {long_context!r}")
    if not kv_cache or not getattr(model, "supports_kv_cache", False):
        return LoopDecoder(model, slots, deterministic)
    gpt: GPTLanguageModel = model  # type: ignore[assignment]  # it has a KV cache
    return graph_or_slot_decoder(
        gpt, slots, cuda_graphs, window_keep=window_keep, dtype=dtype,
        deterministic=deterministic, exact=long_context == "exact",
    )  # fmt: skip


def make_decoder(
    model: LanguageModel,
    idx: torch.Tensor,
    kv_cache: bool = True,
    long_context: str = "window",
    window_keep: float = 0.5,
    cuda_graphs: bool | None = None,
) -> Rows:
    """The (B, T) prompts `idx` read into a new decoder's slots 0..B-1 (`new_decoder`)."""
    decoder = new_decoder(
        model, idx.shape[0], kv_cache, long_context, window_keep, cuda_graphs=cuda_graphs
    )
    return Rows(decoder, idx)
