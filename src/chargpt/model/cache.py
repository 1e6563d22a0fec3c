"""Key/value caches: each decoder block's keys and values of the positions read so far, so that
generation computes each position's keys and values once. `KVCache` holds one batch of sequences
at one length; `SlotKVCache` holds independent sequences, each at its own length (continuous
batching). Attention reads either through the `AttentionCache` protocol."""

from __future__ import annotations

from typing import Protocol

import torch


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

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """(T,) positions of the next T ids: they follow the cached ones."""
        end = self.length + T
        if end > self.capacity:
            raise ValueError(f"sequence length {end} exceeds block_size {self.capacity}")
        return torch.arange(self.length, self.length + T, device=device)

    def query_mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        """Which keys the next T queries may see (see `cached_causal_mask`)."""
        return cached_causal_mask(T, self.length, device)


def cached_causal_mask(T: int, start: int, device: torch.device) -> torch.Tensor | None:
    """Which of start + T keys each of the T newest queries may see: (T, start + T) booleans, or
    None where SDPA needs no explicit mask: a single query sees every key, and from position 0
    `is_causal` is right (it aligns its mask top-left, which is wrong only when the queries are
    the last T positions of a longer sequence). Without a mask, GPUs get the flash kernel."""
    if T == 1 or start == 0:
        return None
    # query i sits at position start + i and sees keys 0..start + i
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)


class AttentionCache(Protocol):
    """What attention needs from a cache: where the next T ids sit, which keys their queries may
    see, and every key and value so far once theirs are stored (`KVCache`, `SlotKVCache`)."""

    def positions(self, T: int, device: torch.device) -> torch.Tensor: ...

    def query_mask(self, T: int, device: torch.device) -> torch.Tensor | None: ...

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class SlotStep:
    """What one batched decode step reads and writes, shared by every block's `SlotKVCache`: a
    span of slots, the position of each one's new id (after its cached ones), and how many of
    each slot's positions attention reads (`keys`: every position that counts must be below).
    Device tensors only, built without reading any back: a CUDA graph can capture it."""

    def __init__(self, rows: slice, positions: torch.Tensor, keys: int, n_head: int, capacity: int):
        self.rows, self.keys = rows, keys
        device = positions.device
        self.positions = positions[:, None]  # (R, 1): where each row's new id goes
        key_positions = torch.arange(keys, device=device)  # (keys,)
        # (R, 1, 1, keys): the new query at position p sees the keys at positions <= p
        self.mask = (key_positions <= self.positions[:, :, None])[:, None]
        # where each row's new key of each head goes among the cache's (slots * n_head *
        # capacity) positions: one index_copy_ stores all of them, (R * n_head,)
        slots = torch.arange(rows.start, rows.start + len(positions), device=device)[:, None]
        heads = torch.arange(n_head, device=device)[None, :]
        self.store = ((slots * n_head + heads) * capacity + self.positions).flatten()


class SlotKVCache:
    """One decoder block's keys and values for `slots` independent sequences, each at its own
    length: slot s holds positions 0..length-1 of its sequence. Each step appends one position
    to every slot of a span and reads the first `keys` positions of each through a mask that
    hides each slot's positions past its own; the caller `select`s the `SlotStep` first."""

    def __init__(
        self,
        slots: int,
        n_head: int,
        capacity: int,
        head_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.k = torch.zeros(slots, n_head, capacity, head_size, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.step: SlotStep | None = None  # until the first `select`

    def select(self, step: SlotStep) -> None:
        """Make the next forward pass run `step`."""
        self.step = step

    def rows(self, start: int, stop: int, length: int = 0) -> KVCache:
        """Slots start..stop-1 as a `KVCache` of `length` positions that stores into this one
        (views, not copies): a prefill from position 0, or a step of rows at one position."""
        cache = KVCache(self.k.shape[2])
        cache.k, cache.v = self.k[start:stop], self.v[start:stop]
        cache.length = length
        return cache

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """(R, 1): each selected slot's new id follows its own cached ones."""
        if T != 1:
            raise ValueError(f"a SlotKVCache step takes one position per slot, not {T}")
        return self.selected.positions

    def query_mask(self, T: int, device: torch.device) -> torch.Tensor:
        """(R, 1, 1, keys): each new query sees its own slot's keys up to its position."""
        return self.selected.mask

    @property
    def selected(self) -> SlotStep:
        if self.step is None:
            raise ValueError("select a SlotStep before running a SlotKVCache step")
        return self.step

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (R, n_head, 1, hs) keys and values at each selected slot's new position;
        return the first `keys` positions of each, (R, n_head, keys, hs) each (views)."""
        step = self.selected
        hs = self.k.shape[-1]
        # one row of hs numbers per (slot, head): a single copy for the whole step
        self.k.view(-1, hs).index_copy_(0, step.store, k.reshape(-1, hs).to(self.k.dtype))
        self.v.view(-1, hs).index_copy_(0, step.store, v.reshape(-1, hs).to(self.v.dtype))
        return self.k[step.rows, :, : step.keys], self.v[step.rows, :, : step.keys]
