"""What both language models share: the loss, the lab's autoregressive `generate`, parameter
counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

M = TypeVar("M", bound=nn.Module)


@contextlib.contextmanager
def eval_mode(model: M) -> Iterator[M]:
    """`model` in eval mode (no dropout) inside the block; afterwards, also when the block
    raises, each of its modules is back in the mode it was in."""
    modes = [(module, module.training) for module in model.modules()]
    if not any(training for _, training in modes):  # eval already: write nothing, since another
        yield model  # thread (the server's engine) may be running the model meanwhile
        return
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


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
        self, idx: torch.Tensor, max_new_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The lab's `generate`: extend (B, T) `idx` by `max_new_tokens` ids sampled one at a time,
        re-reading the last `context_length` ids for each. Returns (B, T + max_new_tokens).
        `chargpt.generation.generate.generate_ids` is the same with a KV cache and the sampling
        controls (temperature, top-k, top-p)."""
        for _ in range(max_new_tokens):
            # crop idx to the last context_length ids: all the model can condition on
            idx_cond = idx[:, -self.context_length :]  # (B, <= context_length)
            # predictions for every position
            logits, _ = self(idx_cond)  # (B, T, V)
            # only the last step predicts the next id
            logits = logits[:, -1, :]  # (B, V)
            # softmax turns the logits into probabilities
            probs = F.softmax(logits.float(), dim=-1)  # (B, V)
            # sample from the distribution
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            # append the sampled id to the running sequence
            idx = torch.cat([idx, idx_next], dim=1)  # (B, T + 1)
        return idx

    def num_parameters(self) -> int:
        """The weights and biases the model computes with, a shared (tied) matrix once; an int8
        model's frozen int8 ones too (chargpt.model.quantize), where a tied LM head is a copy."""
        return sum(p.numel() for p in self.parameters())
