"""Runs for the export tests: small GPTs whose logits are as decisive as a trained model's
(weights wider than the N(0, 0.02) init), so that greedy text is far from ties."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model.gpt import GPTLanguageModel
from chargpt.runs.directory import save_run

BLOCK = 16
TOKENIZER = CharTokenizer(tuple("\n abcdefghij"))


def decisive_gpt(seed: int = 0, **options: Any) -> GPTLanguageModel:
    """A 2-layer GPT with the recipe `options` (ModelConfig fields), in eval mode."""
    shape = dict(block_size=BLOCK, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    config = ModelConfig(**{**shape, **options})
    torch.manual_seed(seed)
    model = GPTLanguageModel(config, TOKENIZER.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def decisive_run(out: Path, **options: Any) -> Path:
    """`decisive_gpt(**options)` saved as a run directory at `out`."""
    model = decisive_gpt(**options)
    save_run(out, model, TOKENIZER, model.config, TrainConfig(), step=0, best_val_loss=2.5)
    return out
