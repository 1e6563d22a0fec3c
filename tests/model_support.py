"""Small GPTs shared by the model and decoding tests: one whose logits are as decisive as a trained
model's, and a fused/reference pair holding the same weights."""

from __future__ import annotations

import dataclasses

import torch

from chargpt.config import ModelConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model.gpt import GPTLanguageModel

BLOCK = 16
TOKENIZER = CharTokenizer(tuple("\n abcdefghij"))


def tiny_gpt(attention: str = "fused", *, seed: int = 0) -> GPTLanguageModel:
    """Weights spread wider than the N(0, 0.02) init, so that greedy choices are far from ties."""
    config = ModelConfig(
        block_size=BLOCK, n_embd=32, n_head=4, n_layer=2, dropout=0.0, attention=attention
    )
    torch.manual_seed(seed)
    model = GPTLanguageModel(config, TOKENIZER.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def gpt_pair(
    config: ModelConfig, vocab_size: int = TOKENIZER.vocab_size
) -> tuple[GPTLanguageModel, GPTLanguageModel]:
    """A fused model and a reference model holding the same (initial) weights, in eval mode."""
    torch.manual_seed(0)
    fused = GPTLanguageModel(dataclasses.replace(config, attention="fused"), vocab_size)
    reference = GPTLanguageModel(dataclasses.replace(config, attention="reference"), vocab_size)
    reference.load_state_dict(fused.state_dict())
    return fused.eval(), reference.eval()
