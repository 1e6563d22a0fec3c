"""Run directories: the files a training run leaves, and how they are written and read back.

A run directory holds
- `model.safetensors`: the best-validation weights (what `sample` and `eval` load);
- `config.json`: model shape, training options, vocabulary and the data the run used;
- `last.safetensors`: the latest training state for `train --resume` (see chargpt.training.state);
- `metrics.jsonl`: one line per loss estimate (see chargpt.runs.metrics);
- `loss.png`: the loss curves (see chargpt.viz.plot).

Weights are safetensors, everything else JSON: no pickle. Every file is written to a temporary
file, flushed to disk and renamed into place, so a crash at any moment leaves the previous
version readable. Weights are written before config.json and carry their own step and val loss
in their header: a crash between the two renames pairs new weights with a config.json whose
shape and vocabulary are the same (they never change within a run), and the loader takes the
step and loss from the weights, not from config.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from chargpt import __version__
from chargpt.config import ModelConfig, TrainConfig, from_dict
from chargpt.data.files import atomic_write, atomic_write_text
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.model import LanguageModel, build_model

# The version of the files a run directory holds (config.json and last.safetensors record it);
# readers take every version up to this one (see `format_version`):
# 1: the first; last.safetensors numbered AdamW's and Muon's parameters in one sequence and
#    kept the LambdaLR schedule's state (chargpt.training.state reads it in today's layout).
# 2: last.safetensors keeps each optimiser's state under its own name (optimizer.adamw.*,
#    optimizer.muon.*) and no schedule state: the schedule follows from the step and the time.
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LAST = "last.safetensors"
META_KEY = "chargpt_meta"  # header entry of model.safetensors: JSON of its step, val loss, ...
# config.json's model entry must name these: they fix the weights' shapes
SHAPE_FIELDS = ("model", "block_size", "n_embd", "n_head", "n_layer")


@dataclass
class Run:
    """Everything a run directory holds, loaded back."""

    model: LanguageModel
    tokenizer: CharTokenizer
    model_config: ModelConfig
    train_config: TrainConfig
    meta: dict[str, Any]


def save_run(
    run_dir: Path,
    model: LanguageModel,
    tokenizer: CharTokenizer,
    model_config: ModelConfig,
    train_config: TrainConfig,
    **meta: Any,
) -> None:
    """Write weights, then the config that describes them (step, best val loss, data, ...)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", META_KEY: json.dumps(meta)}
    atomic_write(run_dir / WEIGHTS, lambda tmp: save_file(cpu_state(model), str(tmp), header))
    config = {
        "format_version": FORMAT_VERSION,
        "chargpt_version": __version__,
        "model": dataclasses.asdict(model_config),
        "train": dataclasses.asdict(train_config),
        "tokenizer": tokenizer.to_dict(),
        **meta,
    }
    atomic_write_text(run_dir / CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as contiguous CPU tensors, ready for safetensors."""
    return cpu_tensors(model.state_dict())


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of `tensors`, ready for safetensors. safetensors refuses tensors
    that share memory (tied embeddings): each name after the first gets its own copy, and
    loading copies the same values into the one shared parameter."""
    state, seen = {}, set()
    for name, value in tensors.items():
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        state[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return state


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; a damaged file is a one-line error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            return tensors, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ChargptError(
            f"{path} is corrupt or truncated ({err}): it cannot be used; retrain the run"
        ) from None


def header_json(path: Path, metadata: dict[str, str], key: str) -> dict[str, Any]:
    """A JSON object stored under `key` in a safetensors header."""
    try:
        value = json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError):
        value = None
    if not isinstance(value, dict):
        raise ChargptError(f"{path} has no valid {key} entry: it was not written by chargpt train")
    return value


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run directory, checked for presence, syntax and format version."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ChargptError(
            f"run directory {str(run_dir)!r} does not exist: pass the --out of a `chargpt train`"
        )
    for name in (CONFIG, WEIGHTS):
        if not (run_dir / name).is_file():
            raise ChargptError(
                f"run directory {str(run_dir)!r} has no {name}: it is not a complete chargpt run"
            )
    try:
        config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ChargptError(
            f"{run_dir / CONFIG} is not valid JSON ({err}): retrain the run"
        ) from None
    if not isinstance(config, dict):
        raise ChargptError(f"{run_dir / CONFIG} is not a JSON object: retrain the run")
    missing = [k for k in ("format_version", "model", "train", "tokenizer") if k not in config]
    if isinstance(config.get("model"), dict):
        missing += [f"model.{k}" for k in SHAPE_FIELDS if k not in config["model"]]
    if missing:
        raise ChargptError(f"{run_dir / CONFIG} lacks {', '.join(missing)}: retrain the run")
    format_version(run_dir / CONFIG, config["format_version"])
    return config


def format_version(path: Path, version: object) -> int:
    """`version`, the format version `path` records, checked: one this chargpt reads."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ChargptError(f"{path} has an invalid format_version ({version!r}): retrain the run")
    if version > FORMAT_VERSION:
        raise ChargptError(
            f"{path} has format version {version}, newer than this chargpt ({__version__}) "
            "reads: upgrade chargpt"
        )
    return version


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", attention: str | None = None
) -> Run:
    """Rebuild model and tokenizer from a run directory; `attention` picks the attention path."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model_config, train_config, tokenizer = run_configs(run_dir, config)
    if attention is not None:
        model_config = dataclasses.replace(model_config, attention=attention)
    state, header = read_safetensors(run_dir / WEIGHTS)
    model = build_model(model_config, tokenizer.vocab_size)
    load_weights(model, state, run_dir / WEIGHTS)
    model.to(device).eval()
    meta = {k: v for k, v in config.items() if k not in ("model", "train", "tokenizer")}
    if META_KEY in header:  # the weights' own step and loss win over a stale config.json
        meta.update(header_json(run_dir / WEIGHTS, header, META_KEY))
    return Run(model, tokenizer, model_config, train_config, meta)


def run_configs(
    run_dir: Path, config: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig, CharTokenizer]:
    """The model and training configs and the vocabulary that config.json describes."""
    try:
        model_config = from_dict(ModelConfig, dict(config["model"]))
        train_config = from_dict(TrainConfig, dict(config["train"]))
        tokenizer = CharTokenizer.from_dict(config["tokenizer"])
    except (ChargptError, ValueError, TypeError, AttributeError) as err:
        raise ChargptError(f"{run_dir / CONFIG} is invalid ({err}): retrain the run") from None
    return model_config, train_config, tokenizer


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load `state` into `model`; tensors of other names or shapes mean the files disagree."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise ChargptError(
            f"{path.parent} is inconsistent: {path.name} does not match config.json ({first}): "
            "retrain the run"
        ) from None


def check_new_run_dir(out: Path, model_config: ModelConfig, vocab_size: int) -> None:
    """Never overwrite a user's run; fail before training if the directory cannot be written
    or its disk cannot hold the checkpoints of this model."""
    if (out / CONFIG).exists() or (out / WEIGHTS).exists() or (out / LAST).exists():
        raise ChargptError(
            f"{out} already holds a run: continue it with --resume {out}, or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise ChargptError(f"--out {out} is a file: choose a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process under torchrun
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(out).free
    except OSError as err:
        raise ChargptError(
            f"cannot write to --out {out} ({err.strerror}): choose another"
        ) from None
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        num_parameters = build_model(model_config, vocab_size).num_parameters()
    # fp32 weights twice (best, last), two AdamW moments, and a temporary copy while renaming
    needed = 2 * 4 * 4 * num_parameters + 2**20
    if free < needed:
        raise ChargptError(
            f"--out {out} has {free / 2**20:,.1f} MiB free but the run needs about "
            f"{needed / 2**20:,.1f} MiB: free some space or choose another --out"
        )


@contextlib.contextmanager
def removed_if_failed(out: Path) -> Iterator[None]:
    """Directories this command creates are removed again if it fails before writing into them."""
    created = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    try:
        yield
    except BaseException:
        for path in created:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
