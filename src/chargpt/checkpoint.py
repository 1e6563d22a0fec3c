"""Run directories: weights in `model.safetensors`, everything else in `config.json`. No pickle.

Every file is written to a temporary file, flushed to disk and renamed into place, so a crash
at any moment leaves the previous version readable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from chargpt import __version__
from chargpt.config import ModelConfig, TrainConfig, from_dict
from chargpt.errors import ChargptError
from chargpt.models import LanguageModel, build_model
from chargpt.tokenizer import CharTokenizer

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / WEIGHTS, lambda tmp: save_file(state, str(tmp), {"format": "pt"}))
    config = {
        "format_version": FORMAT_VERSION,
        "chargpt_version": __version__,
        "model": dataclasses.asdict(model_config),
        "train": dataclasses.asdict(train_config),
        "tokenizer": tokenizer.to_dict(),
        **meta,
    }
    atomic_write_text(run_dir / CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


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
    if missing:
        raise ChargptError(f"{run_dir / CONFIG} lacks {', '.join(missing)}: retrain the run")
    if config["format_version"] > FORMAT_VERSION:
        raise ChargptError(
            f"{run_dir / CONFIG} has format version {config['format_version']}, newer than this "
            f"chargpt ({__version__}) reads: upgrade chargpt"
        )
    return config


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", attention: str | None = None
) -> Run:
    """Rebuild model and tokenizer from a run directory; `attention` picks the attention path."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model_values = dict(config["model"])
    if attention is not None:
        model_values["attention"] = attention
    model_config = from_dict(ModelConfig, model_values)
    train_config = from_dict(TrainConfig, config["train"])
    tokenizer = CharTokenizer.from_dict(config["tokenizer"])
    try:
        state = load_file(str(run_dir / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise ChargptError(
            f"{run_dir / WEIGHTS} is corrupt or truncated ({err}): retrain the run"
        ) from None
    model = build_model(model_config, tokenizer.vocab_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise ChargptError(
            f"{run_dir} is inconsistent: its weights do not match config.json ({first})"
        ) from None
    model.to(device).eval()
    meta = {k: v for k, v in config.items() if k not in ("model", "train", "tokenizer")}
    return Run(model, tokenizer, model_config, train_config, meta)
