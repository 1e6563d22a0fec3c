"""The lab's baseline: each character reads the next character's logits from a lookup table."""

from __future__ import annotations

import torch
from torch import nn

from chargpt.model.base import LanguageModel


class BigramLanguageModel(LanguageModel):
    """logits[next] = table[current]: a (vocab_size, vocab_size) embedding and nothing else."""

    context_length = 1  # a bigram only ever needs the last character

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        # row i holds the logits of the character that follows character i
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.token_embedding_table(idx)  # (B, T) -> (B, T, V)
