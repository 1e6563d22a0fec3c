"""What both language models share: the loss, autoregressive `generate`, parameter counts."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from chargpt.decoding import make_decoder
from chargpt.sampling import Generators, sample_next


class LanguageModel(nn.Module):
    """A next-character model: `forward(idx, targets) -> (logits, loss)` plus `generate`."""

    # how many of the most recent characters the model conditions on
    context_length: int

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) next-token logits."""
        raise NotImplementedError

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.logits(idx)  # (B, T, V)
        if targets is None:
            return logits, None
        # cross-entropy over every position of every sequence: (B*T, V) against (B*T,)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    @torch.inference_mode()
    def generate_steps(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = 0,
        generator: Generators = None,
        top_p: float = 1.0,
        **decoding: object,
    ) -> Iterator[torch.Tensor]:
        """Yield `max_new_tokens` sampled (B, 1) ids that continue the (B, T) ids `idx`.
        `decoding` (kv_cache, long_context, window_keep) goes to `chargpt.decoding.make_decoder`."""
        if max_new_tokens == 0:
            return
        decoder = make_decoder(self, idx, **decoding)  # reads the prompt once
        for step in range(max_new_tokens):
            idx_next = sample_next(decoder.logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield idx_next
            if step + 1 < max_new_tokens:  # no forward pass for a token nobody will read
                decoder.append(idx_next)

    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = 0,
        generator: Generators = None,
        **options: object,
    ) -> torch.Tensor:
        """Extend (B, T) `idx` by `max_new_tokens` sampled ids (the lab's `generate`); `options`
        are those of `generate_steps`. Returns (B, T + max_new_tokens)."""
        steps = self.generate_steps(idx, max_new_tokens, temperature, top_k, generator, **options)
        return torch.cat([idx, *steps], dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
