"""How the engine runs the model for the sequences in its slots: `SlotBackend` decodes every slot
of the fused GPT in one forward pass per step; `LoopBackend` gives bigram and `reference`-attention
runs the lab's decoder per sequence (one forward pass each per step), as `chargpt sample` does."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

from chargpt.generation.decoders import Decoder, SlotDecoder, make_decoder
from chargpt.model import LanguageModel

if TYPE_CHECKING:
    from chargpt.model.gpt import GPTLanguageModel


class SlotBackend:
    """The fused GPT: every running sequence in one `SlotDecoder` pass per step."""

    def __init__(
        self,
        model: LanguageModel,
        slots: int,
        window_keep: float,
        dtype: torch.dtype,
        deterministic: bool,
    ):
        gpt = cast("GPTLanguageModel", model)  # `make_backend` checked: it has a KV cache
        self.decoder = SlotDecoder(gpt, slots, window_keep, dtype, deterministic)

    def start(self, slot: int, ids: list[int]) -> None:
        self.decoder.start(slot, ids)

    def logits(self, slots: list[int]) -> torch.Tensor:
        return self.decoder.logits[slots]  # (R, V)

    def append(self, next_ids: dict[int, int]) -> None:
        self.decoder.append(next_ids)

    def free(self, slot: int) -> None:
        self.decoder.free(slot)


class LoopBackend:
    """Bigram and `reference`-attention runs: the lab's decoder for each sequence, as in
    `chargpt sample`; one forward pass per sequence per step."""

    def __init__(self, model: LanguageModel, window_keep: float):
        self.model, self.window_keep = model, window_keep
        self.decoders: dict[int, Decoder] = {}
        self.device = next(model.parameters()).device

    def start(self, slot: int, ids: list[int]) -> None:
        idx = torch.tensor([ids], device=self.device)
        self.decoders[slot] = make_decoder(self.model, idx, window_keep=self.window_keep)

    def logits(self, slots: list[int]) -> torch.Tensor:
        return torch.cat([self.decoders[slot].logits for slot in slots])  # (R, V)

    def append(self, next_ids: dict[int, int]) -> None:
        for slot, token in next_ids.items():
            self.decoders[slot].append(torch.tensor([[token]], device=self.device))

    def free(self, slot: int) -> None:
        self.decoders.pop(slot, None)  # idempotent: a slot whose start failed has no decoder


def make_backend(
    model: LanguageModel,
    slots: int,
    window_keep: float,
    dtype: torch.dtype,
    deterministic: bool = False,
) -> SlotBackend | LoopBackend:
    """Batched slots where the model has a KV cache (the fused GPT), the lab's loop otherwise
    (one sequence per pass: deterministic anyway)."""
    if getattr(model, "supports_kv_cache", False):
        return SlotBackend(model, slots, window_keep, dtype, deterministic)
    return LoopBackend(model, window_keep)
