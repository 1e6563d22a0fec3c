"""Decoding: next-character logits for growing sequences, with or without a key/value cache.

`Decoder` is the lab's loop: every new character re-runs the model on the last `context_length`
ids. `CachedDecoder` (the fused GPT) reads the prompt once and then runs one position per new
character, reusing every earlier position's keys and values from a `KVCache` per block.
`SlotDecoder` does the same for many independent sequences at once, each in a slot of a
`SlotKVCache` at its own position, and lets sequences start and end between steps (continuous
batching, as `chargpt serve` uses it). Past block_size, both cached decoders follow one
`Window` rule. The caches themselves are in `chargpt.model.cache`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from chargpt.model.cache import KVCache, SlotKVCache, SlotStep

if TYPE_CHECKING:
    from chargpt.model.base import LanguageModel
    from chargpt.model.gpt import GPTLanguageModel

KEY_BUCKET = 32  # SlotDecoder's steps read keys in multiples of this many positions


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
    """Next-token logits for a batch of growing sequences: read `logits`, then `append` the ids
    chosen. This one is the lab's loop: every new token re-runs the model on the last
    `context_length` ids. It keeps only those, so a bigram (context 1) costs O(1) per token."""

    def __init__(self, model: LanguageModel, idx: torch.Tensor):
        self.model = model
        self.idx = idx[:, -model.context_length :]  # (B, <= context): all the next id depends on
        self.logits = model.logits(self.idx)[:, -1, :]  # (B, V): only the last position matters

    def append(self, idx_next: torch.Tensor) -> None:
        """Extend every sequence by its (B, 1) next id and compute the following logits."""
        self.idx = torch.cat([self.idx, idx_next], dim=1)[:, -self.model.context_length :]
        self.logits = self.model.logits(self.idx)[:, -1, :]  # (B, V)


class CachedDecoder(Decoder):
    """Generation with a KV cache: the prompt is read once (prefill), then one position per token
    (`GPTLanguageModel.step`, the lean decode step). Past block_size, `exact` re-reads the last
    block_size ids for every new token (the lab's meaning, a full forward pass per token);
    otherwise the `Window` rule restarts the cache from the latest `keep` ids."""

    def __init__(self, model: GPTLanguageModel, idx: torch.Tensor, exact: bool, keep: int):
        self.model = model
        self.exact = exact
        self.window = Window(model.config.block_size, keep)
        self.idx = self.window.context(idx)  # (B, <= block_size): the ids of the last prefill
        self.prefill()

    def prefill(self) -> None:
        """Fill fresh caches with the keys and values of `idx`, in one forward pass."""
        self.caches = [KVCache(self.window.block_size) for _ in self.model.blocks]
        self.logits = self.model.logits(self.idx, self.caches)[:, -1, :]  # (B, V)
        self.stepped: list[torch.Tensor] = []  # (B, 1) ids run one at a time since, not in idx

    def append(self, idx_next: torch.Tensor) -> None:
        if self.window.has_room(self.caches[0].length):  # run the new position alone
            self.stepped.append(idx_next)  # joined to idx only when the cache is full
            self.logits = self.model.step(idx_next, self.caches)  # (B, V)
            return
        self.idx = self.window.context(torch.cat([self.idx, *self.stepped, idx_next], dim=1))
        self.stepped = []
        if self.exact:  # full: recompute the last block_size positions, cache unused
            self.logits = self.model.logits(self.idx)[:, -1, :]
        else:  # full: restart the cache from the most recent `keep` ids
            self.idx = self.window.restart(self.idx)
            self.prefill()


def make_decoder(
    model: LanguageModel,
    idx: torch.Tensor,
    kv_cache: bool = True,
    long_context: str = "window",
    window_keep: float = 0.5,
) -> Decoder:
    """The KV-cached decoder where the model has one (the fused GPT), the lab's loop otherwise.
    `long_context` and `window_keep` say what the cached decoder does past block_size."""
    if long_context not in ("window", "exact"):
        raise ValueError(f"long_context must be 'window' or 'exact', got {long_context!r}")
    if not kv_cache or not getattr(model, "supports_kv_cache", False):
        return Decoder(model, idx)
    keep = window_length(model.context_length, window_keep)
    return CachedDecoder(model, idx, exact=long_context == "exact", keep=keep)


class SlotDecoder:
    """Next-token logits for up to `slots` independent sequences of one fused GPT, each at its own
    position (continuous batching): `start` a sequence in a free slot, `append` the next ids of
    any set of slots in one forward pass, `free` a slot for the next sequence.

    A prompt is read by itself (B = 1). A step runs the fewest rows and keys it can: the span of
    slots from the first to the last one stepping, over keys up to the longest of them, rounded
    up to a multiple of KEY_BUCKET (`step_shape`). Then a row's numbers can depend on the others
    in the last bits (a CPU's matrix product may round differently for a different number of
    rows). With `deterministic`, every step runs all slots over all block_size keys: the shapes,
    and with them the order of every floating-point sum, are the same whatever the batch holds,
    so a row's logits depend on its own sequence alone, bit for bit. Past block_size each slot
    follows the `Window` rule, as `CachedDecoder` does (a restart is read alone again)."""

    def __init__(
        self,
        model: GPTLanguageModel,
        slots: int,
        window_keep: float = 0.5,
        dtype: torch.dtype | None = None,
        deterministic: bool = False,
    ):
        if not model.supports_kv_cache:
            raise ValueError("SlotDecoder needs the fused attention path (a KV cache)")
        c = model.config
        param = next(model.parameters())
        self.model = model
        self.window = Window.of(c.block_size, window_keep)
        self.deterministic = deterministic
        shape = (slots, c.n_head, c.block_size, c.n_embd // c.n_head)
        dtype = dtype or param.dtype  # the forward passes' (bf16 where it is fast)
        self.caches = [SlotKVCache(*shape, param.device, dtype) for _ in model.blocks]
        self.ids: list[list[int]] = [[] for _ in range(slots)]  # each slot's last block_size ids
        self.lengths = [0] * slots  # positions cached in each slot
        # (slots, V): the next-token logits of each busy slot
        self.logits = torch.zeros(slots, model.vocab_size, device=param.device)

    def start(self, slot: int, ids: list[int]) -> None:
        """Begin a sequence in `slot`: read the last block_size of `ids` in one forward pass."""
        self.ids[slot] = self.window.context(list(ids))
        self.prefill(slot)

    def free(self, slot: int) -> None:
        self.ids[slot], self.lengths[slot] = [], 0

    def append(self, next_ids: Mapping[int, int]) -> None:
        """Extend each slot in `next_ids` by its id and compute its next logits; other slots keep
        their place."""
        stepping = {}
        for slot, token in next_ids.items():
            self.ids[slot] = self.window.context(self.ids[slot] + [token])
            if self.window.has_room(self.lengths[slot]):  # one position, batched
                stepping[slot] = token
        if stepping:
            self.step(stepping)
        for slot in next_ids.keys() - stepping.keys():  # full: restart from the latest ids
            self.ids[slot] = self.window.restart(self.ids[slot])
            self.prefill(slot)

    def prefill(self, slot: int) -> None:
        """Fill `slot` with the keys and values of its ids from position 0, alone."""
        idx = torch.tensor([self.ids[slot]], device=self.logits.device)  # (1, T)
        caches = [cache.row(slot) for cache in self.caches]
        self.logits[slot] = self.model.logits(idx, caches)[0, -1]  # (V,)
        self.lengths[slot] = idx.shape[1]

    def step_shape(self, next_ids: Mapping[int, int]) -> tuple[slice, int]:
        """The slots and the keys that a step for `next_ids` reads: all of both when
        deterministic; else from the first to the last slot stepping (sequences kept in the
        lowest free slots keep this span short) over the positions up to the longest one's new
        position, rounded up to a multiple of KEY_BUCKET (so that few shapes ever run)."""
        if self.deterministic:
            return slice(0, len(self.lengths)), self.window.block_size
        # keys the newest position sees: at most block_size, as every stepping slot has room
        longest = max(self.lengths[slot] for slot in next_ids) + 1
        keys = min(self.window.block_size, -(-longest // KEY_BUCKET) * KEY_BUCKET)
        return slice(min(next_ids), max(next_ids) + 1), keys

    def step(self, next_ids: Mapping[int, int]) -> None:
        """One position for every slot in `next_ids`, in one forward pass over `step_shape`'s
        slots and keys. The other slots in that span run too, on id 0 at their next free
        position (a full slot: its last, and it restarts before anything reads it)."""
        device = self.logits.device
        rows, keys = self.step_shape(next_ids)
        span = range(rows.start, rows.stop)
        ids = torch.tensor([[next_ids.get(slot, 0)] for slot in span], device=device)  # (R, 1)
        last = self.window.block_size - 1
        lengths = torch.tensor([min(self.lengths[slot], last) for slot in span], device=device)
        step = SlotStep(rows, lengths, keys)
        for cache in self.caches:
            cache.select(step)
        logits = self.model.logits(ids, self.caches)[:, -1]  # (R, V)
        stepped = list(next_ids)
        self.logits[stepped] = logits[[slot - rows.start for slot in stepped]].to(self.logits.dtype)
        for slot in next_ids:
            self.lengths[slot] += 1
