"""Which learning rate lets the bigram baseline converge within the GPT's training budget?

Trains the lab's bigram with the `cpu` preset's settings (batch, schedule, weight decay), for
1,200 steps by default (the budget the default rate was chosen at), at several peak learning
rates, and prints each one's full-pass validation loss beside the count-based bigram's (the
best any bigram can do, up to smoothing). `chargpt compare` uses the result as the default of
--bigram-learning-rate.

    python benchmarks/bigram_learning_rate.py [--max-iters N] [--rates 2e-3 1e-2 3e-2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path

import torch

from chargpt.config.presets import build_configs
from chargpt.data.corpus import load_text
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.eval.counts import count_cross_entropy
from chargpt.eval.evaluate import full_pass_loss, validation_stream
from chargpt.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iters", type=int, default=1200, help="steps (default: 1200)")
    parser.add_argument("--rates", type=float, nargs="+", default=[2e-3, 1e-2, 3e-2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {"model": "bigram", "device": "cpu", "sample_chars": 0, "max_iters": args.max_iters}
    model_config, train_config = build_configs("cpu", False, overrides)
    text = load_text("shakespeare")
    tokenizer = CharTokenizer.from_text(text)
    dataset = CharDataset.from_text(text, tokenizer)
    block = model_config.block_size
    tokens, start = validation_stream(dataset, block)
    counts = count_cross_entropy(dataset.train, tokens[start - 1 :], tokenizer.vocab_size, 2)
    print(f"cpu preset, {train_config.max_iters} steps, {train_config.lr_schedule} schedule")
    print(f"count-based bigram (add-one), val: {counts:.4f}")
    for lr in args.rates:
        cfg = dataclasses.replace(train_config, learning_rate=lr, min_lr=lr / 10)
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
            trainer = Trainer(model_config, cfg, dataset, tokenizer, Path(out))
            trainer.run()
        loss, _ = full_pass_loss(trainer.model, tokens, block, start, block // 2, 64)
        print(f"bigram, peak lr {lr:g}: val {loss:.4f} ({loss - counts:+.4f} vs counts)")


if __name__ == "__main__":
    main()
