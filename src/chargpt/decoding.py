"""Decoding: next-character logits for growing sequences, with or without a key/value cache.

`Decoder` is the lab's loop: every new character re-runs the model on the last `context_length`
ids. `CachedDecoder` (the fused GPT) reads the prompt once and then runs one position per new
character, reusing every earlier position's keys and values from a `KVCache` per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # type hints only: the models import this module
    from chargpt.models.base import LanguageModel
    from chargpt.models.gpt import GPTLanguageModel


class KVCache:
    """One decoder block's keys and values for positions 0..length-1, so that generation
    computes each position's keys and values once. Room for `capacity` positions."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        # (B, n_head, capacity, hs) each, allocated by the first append (its batch and dtype)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # positions filled

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, n_head, T, hs) keys and values of the next T positions; return those of
        every position so far, (B, n_head, length, hs) each."""
        B, n_head, T, hs = k.shape
        if self.k is None or self.v is None:
            self.k = k.new_empty(B, n_head, self.capacity, hs)
            self.v = v.new_empty(B, n_head, self.capacity, hs)
        start, end = self.length, self.length + T
        if end > self.capacity:
            raise ValueError(f"KVCache holds {self.capacity} positions, {end} were appended")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def cached_causal_mask(T: int, start: int, device: torch.device) -> torch.Tensor | None:
    """Which of start + T keys each of the T newest queries may see: (T, start + T) booleans, or
    None where SDPA needs no explicit mask: a single query sees every key, and from position 0
    `is_causal` is right (it aligns its mask top-left, which is wrong only when the queries are
    the last T positions of a longer sequence). Without a mask, GPUs get the flash kernel."""
    if T == 1 or start == 0:
        return None
    # query i sits at position start + i and sees keys 0..start + i
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)


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
    """Generation with a KV cache: the prompt is read once (prefill), then one position per token.

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
        self.idx = idx[:, -self.block_size :]  # (B, <= block_size): all the next id depends on
        self.prefill()

    def prefill(self) -> None:
        """Fill fresh caches with the keys and values of `idx`, in one forward pass."""
        self.caches = [KVCache(self.block_size) for _ in self.model.blocks]
        self.logits = self.model.logits(self.idx, self.caches)[:, -1, :]  # (B, V)

    def append(self, idx_next: torch.Tensor) -> None:
        self.idx = torch.cat([self.idx, idx_next], dim=1)[:, -self.block_size :]
        if self.caches[0].length < self.block_size:  # room left: run the new position alone
            self.logits = self.model.logits(idx_next, self.caches)[:, -1, :]  # (B, V)
        elif self.exact:  # full: recompute the last block_size positions, cache unused
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
    block_size = model.context_length
    keep = min(max(1, int(window_keep * block_size)), block_size - 1)
    return CachedDecoder(model, idx, exact=long_context == "exact", keep=keep)
