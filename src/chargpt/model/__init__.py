"""The lab's two language models: the bigram baseline and the GPT decoder."""

from __future__ import annotations

from chargpt.config import ModelConfig
from chargpt.model.base import LanguageModel, eval_mode
from chargpt.model.bigram import BigramLanguageModel
from chargpt.model.gpt import (
    CausalSelfAttention,
    DecoderBlock,
    FeedForward,
    GPTLanguageModel,
    Head,
    MultiHeadAttention,
)

__all__ = [
    "BigramLanguageModel",
    "CausalSelfAttention",
    "DecoderBlock",
    "FeedForward",
    "GPTLanguageModel",
    "Head",
    "LanguageModel",
    "MultiHeadAttention",
    "build_model",
    "eval_mode",
]


def build_model(config: ModelConfig, vocab_size: int) -> LanguageModel:
    """The model that `config.model` names, sized for `vocab_size` characters."""
    if config.model == "bigram":
        return BigramLanguageModel(vocab_size)
    return GPTLanguageModel(config, vocab_size)
