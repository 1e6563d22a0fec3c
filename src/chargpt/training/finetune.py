"""Fine-tuning: what `chargpt train --init-from RUN --data NEW --out NEW_RUN` does, for Python
users too.

trainer = finetune_run("runs/shakespeare", "cartas", "runs/cartas", max_iters=300)
trainer.run()

A new run that starts from RUN's saved weights, the ones `chargpt sample` loads (those of the best
validation estimate; with ema_decay, of the moving average), with its own optimiser, schedule and
run directory. The model's shape comes from RUN: of the model options only how it runs
(`attention`, `dropout`) may be set anew, and a size that disagrees is an error. The training
options are a new run's (preset, TOML file, flags). Characters of NEW that RUN never saw join the
vocabulary (chargpt.data.tokenizer.join_vocabularies, chargpt.model.resize), or with on_unknown
"skip" are dropped from NEW, or with "error" refused. The new run is an ordinary run: `--resume`,
`sample`, `eval` and `serve` take it as any other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from chargpt.config import ModelConfig, TrainConfig, build_configs, from_dict
from chargpt.config.presets import split_overrides
from chargpt.data.dataset import in_vocabulary, load_corpus
from chargpt.data.tokenizer import join_vocabularies
from chargpt.errors import ChargptError
from chargpt.model.precision import resolve_device
from chargpt.model.resize import resize_vocabulary
from chargpt.runs.directory import check_new_run_dir, load_run
from chargpt.training.trainer import Trainer

NEW_MODEL_OPTIONS = ("attention", "dropout")  # how the model runs, not what its weights are


def finetune_configs(
    run_model: ModelConfig, preset: str, has_gpu: bool, changes: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """RUN's model config with `attention` and `dropout` from `changes`, which may not change
    its shape; and a new run's training config (defaults, `preset`, then `changes`)."""
    model_changes, train_changes = split_overrides(changes)
    refused = [
        f"--{name.replace('_', '-')} {value} (the run has {getattr(run_model, name)})"
        for name, value in model_changes.items()
        if name not in NEW_MODEL_OPTIONS and value != getattr(run_model, name)
    ]
    if refused:
        raise ChargptError(
            f"a fine-tuned run keeps the model shape of --init-from: {', '.join(refused)}: drop "
            f"{'it' if len(refused) == 1 else 'them'} (only --attention and --dropout may change)"
        )
    model_values = {**dataclasses.asdict(run_model), **model_changes}
    model_config = from_dict(ModelConfig, model_values)
    _, train_config = build_configs(preset, has_gpu, train_changes)
    model_config.validate()
    return model_config, train_config


def finetune_run(
    init_from: str | Path,
    data: str | Path,
    out: str | Path,
    encoding_errors: str = "strict",
    preset: str = "auto",
    **changes: Any,
) -> Trainer:
    """A Trainer for a new run in `out` that fine-tunes the run in `init_from` on `data` (call
    `.run()`); `changes` are options, as `chargpt train` flags name them."""
    init_from, out = Path(init_from), Path(out)
    run = load_run(init_from)
    has_gpu = torch.cuda.is_available()
    model_config, train_config = finetune_configs(run.model_config, preset, has_gpu, changes)
    train_config = dataclasses.replace(train_config, init_from=str(init_from.resolve()))
    resolve_device(train_config.device)
    dataset, own, digest = load_corpus(data, encoding_errors)
    tokenizer = join_vocabularies(run.tokenizer, own, train_config.on_unknown)
    dataset = in_vocabulary(dataset, own, tokenizer, skip=train_config.on_unknown == "skip")
    dataset.check_block_size(model_config.block_size)
    new_ids = [tokenizer.stoi[ch] for ch in run.tokenizer.chars]
    model = resize_vocabulary(run.model, model_config, new_ids, tokenizer.vocab_size)
    check_new_run_dir(out, model_config, tokenizer.vocab_size)
    return Trainer(
        model_config,
        train_config,
        dataset,
        tokenizer,
        out,
        str(data),
        data_sha256=digest,
        init_weights=model.state_dict(),
    )
