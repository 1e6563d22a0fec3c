"""What both language models share: the loss, autoregressive `generate`, parameter counts."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from chargpt.sampling import sample_next


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

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend (B, T) `idx` by `max_new_tokens` sampled ids, each conditioned on the last
        `context_length` ids (the lab's loop). Returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.context_length :]  # crop to what the model can see
            logits = self.logits(idx_cond)[:, -1, :]  # (B, V): only the last position matters
            idx_next = sample_next(logits, temperature, top_k, generator)  # (B, 1)
            idx = torch.cat([idx, idx_next], dim=1)  # (B, T+1)
        return idx

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
