"""Decoding: next-character logits for growing sequences, with or without a key/value cache.

`Decoder` is the lab's loop: every new character re-runs the model on the last `context_length`
ids. `CachedDecoder` (the fused GPT) reads the prompt once and then runs one position per new
character, reusing every earlier position's keys and values from a `KVCache` per block.
`SlotDecoder` does the same for many independent sequences at once, each in a slot of a
`SlotKVCache` at its own position, and lets sequences start and end between steps (continuous
batching, as `chargpt serve` uses it). The caches themselves are in `chargpt.model.cache`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from chargpt.model.cache import KVCache, SlotKVCache

if TYPE_CHECKING:
    from chargpt.model.base import LanguageModel
    from chargpt.model.gpt import GPTLanguageModel


def window_length(block_size: int, window_keep: float) -> int:
    """How many of the latest ids a full cache restarts from in window mode: in [1, block_size)."""
    return min(max(1, int(window_keep * block_size)), block_size - 1)


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
    (`GPTLanguageModel.step`, the lean decode step).

    Positions are learned absolute embeddings, so once the text outgrows block_size every cached
    key sits at the wrong position. Then `exact` re-reads the last block_size ids for every new
    token (the lab's meaning, a full forward pass per token); otherwise the cache restarts from
    the last `keep` ids (one prefill per block_size - keep tokens), so every token still sees at
    least `keep` characters."""

    def __init__(self, model: GPTLanguageModel, idx: torch.Tensor, exact: bool, keep: int):
        self.model = model
        self.exact = exact
        self.keep = keep
        self.block_size = model.config.block_size
        self.idx = idx[:, -self.block_size :]  # (B, <= block_size): the ids of the last prefill
        self.prefill()

    def prefill(self) -> None:
        """Fill fresh caches with the keys and values of `idx`, in one forward pass."""
        self.caches = [KVCache(self.block_size) for _ in self.model.blocks]
        self.logits = self.model.logits(self.idx, self.caches)[:, -1, :]  # (B, V)
        self.stepped: list[torch.Tensor] = []  # (B, 1) ids run one at a time since, not in idx

    def append(self, idx_next: torch.Tensor) -> None:
        if self.caches[0].length < self.block_size:  # room left: run the new position alone
            self.stepped.append(idx_next)  # joined to idx only when the cache is full
            self.logits = self.model.step(idx_next, self.caches)  # (B, V)
            return
        self.idx = torch.cat([self.idx, *self.stepped, idx_next], dim=1)[:, -self.block_size :]
        self.stepped = []
        if self.exact:  # full: recompute the last block_size positions, cache unused
            self.logits = self.model.logits(self.idx)[:, -1, :]
        else:  # full: restart the cache from the most recent `keep` ids
            self.idx = self.idx[:, -self.keep :]
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

    A row's logits depend on its own sequence alone: a prompt is read by itself (B = 1), and every
    step runs all slots over all block_size keys, so the shapes, and with them the order of every
    floating-point sum, are the same whichever slots are busy and however long they are. Past
    block_size each slot follows `CachedDecoder`'s window rule: when its cache is full, it
    restarts from its last `window_length(block_size, window_keep)` ids (read alone again)."""

    def __init__(
        self,
        model: GPTLanguageModel,
        slots: int,
        window_keep: float = 0.5,
        dtype: torch.dtype | None = None,
    ):
        if not model.supports_kv_cache:
            raise ValueError("SlotDecoder needs the fused attention path (a KV cache)")
        c = model.config
        param = next(model.parameters())
        self.model = model
        self.block_size = c.block_size
        self.keep = window_length(c.block_size, window_keep)
        shape = (slots, c.n_head, c.block_size, c.n_embd // c.n_head)
        dtype = dtype or param.dtype
        self.caches = [SlotKVCache(*shape, param.device, dtype) for _ in model.blocks]
        self.ids: list[list[int]] = [[] for _ in range(slots)]  # each slot's last block_size ids
        self.lengths = [0] * slots  # positions cached in each slot
        # (slots, V): the next-token logits of each busy slot
        self.logits = torch.zeros(slots, model.vocab_size, device=param.device)

    def start(self, slot: int, ids: list[int]) -> None:
        """Begin a sequence in `slot`: read the last block_size of `ids` in one forward pass."""
        self.ids[slot] = list(ids[-self.block_size :])
        self.prefill(slot)

    def free(self, slot: int) -> None:
        self.ids[slot], self.lengths[slot] = [], 0

    def append(self, next_ids: Mapping[int, int]) -> None:
        """Extend each slot in `next_ids` by its id and compute its next logits; other slots keep
        their place."""
        stepping = {}
        for slot, token in next_ids.items():
            self.ids[slot] = (self.ids[slot] + [token])[-self.block_size :]
            if self.lengths[slot] < self.block_size:  # room left: one position, batched
                stepping[slot] = token
        if stepping:
            self.step(stepping)
        for slot in next_ids.keys() - stepping.keys():  # full: restart from the latest `keep` ids
            self.ids[slot] = self.ids[slot][-self.keep :]
            self.prefill(slot)

    def prefill(self, slot: int) -> None:
        """Fill `slot` with the keys and values of its ids from position 0, alone."""
        idx = torch.tensor([self.ids[slot]], device=self.logits.device)  # (1, T)
        caches = [cache.row(slot) for cache in self.caches]
        self.logits[slot] = self.model.logits(idx, caches)[0, -1]  # (V,)
        self.lengths[slot] = idx.shape[1]

    def step(self, next_ids: Mapping[int, int]) -> None:
        """One position for every slot in `next_ids`, in one forward pass. The other slots run
        too, so that every step has the same shapes: on id 0, stored at their next free position
        (a full slot: its last, and it restarts before anything reads it)."""
        device = self.logits.device
        ids = [[next_ids.get(slot, 0)] for slot in range(len(self.lengths))]
        lengths = torch.tensor([min(n, self.block_size - 1) for n in self.lengths], device=device)
        for cache in self.caches:
            cache.lengths = lengths
        logits = self.model.logits(torch.tensor(ids, device=device), self.caches)  # (slots, 1, V)
        rows = torch.tensor(list(next_ids), device=device)
        self.logits[rows] = logits[rows, -1].to(self.logits.dtype)
        for slot in next_ids:
            self.lengths[slot] += 1
