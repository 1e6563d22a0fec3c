"""Run directories: weights in safetensors files, everything else in JSON. No pickle.

A run directory holds
- `model.safetensors`: the best-validation weights (what `sample` and `eval` load);
- `config.json`: model shape, training options, vocabulary and the data the run used;
- `last.safetensors`: the latest training state for `train --resume`: weights, AdamW moments and
  random-number-generator states as tensors, with the scalars (step, best val loss, schedule,
  ...) as JSON in the same file's header, so that one rename replaces all of it at once;
- `metrics.jsonl`: one line per loss estimate.

Every file is written to a temporary file, flushed to disk and renamed into place, so a crash
at any moment leaves the previous version readable. Weights are written before config.json and
carry their own step and val loss in their header: a crash between the two renames pairs new
weights with a config.json whose shape and vocabulary are the same (they never change within a
run), and the loader takes the step and loss from the weights, not from config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from chargpt import __version__
from chargpt.config import ModelConfig, TrainConfig, from_dict
from chargpt.errors import ChargptError
from chargpt.models import LanguageModel, build_model
from chargpt.tokenizer import CharTokenizer

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LAST = "last.safetensors"
META_KEY = "chargpt_meta"  # header entry of model.safetensors: JSON of its step, val loss, ...
STATE_KEY = "trainer_state"  # last.safetensors header entry: JSON of the trainer's scalars
# config.json's model entry must name these: they fix the weights' shapes
SHAPE_FIELDS = ("model", "block_size", "n_embd", "n_head", "n_layer")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of an ordinary new file, not mkstemp's 0600
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
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


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
    version = config["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise ChargptError(f"{run_dir / CONFIG} has an invalid format_version: retrain the run")
    if version > FORMAT_VERSION:
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


def save_trainer_state(
    run_dir: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Write the whole resumable state as one file, so that it is replaced in one rename."""
    header = {"format": "pt", STATE_KEY: json.dumps({"format_version": FORMAT_VERSION, **state})}
    atomic_write(run_dir / LAST, lambda tmp: save_file(tensors, str(tmp), header))


def load_trainer_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and scalars of `last.safetensors`, for `train --resume`."""
    path = Path(run_dir) / LAST
    if not path.is_file():
        raise ChargptError(
            f"run directory {str(run_dir)!r} has no {LAST}: it holds no resumable state "
            "(written by `chargpt train` at every evaluation); start a new run"
        )
    tensors, header = read_safetensors(path)
    state = header_json(path, header, STATE_KEY)
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ChargptError(
            f"{path} has format version {version}, which this chargpt ({__version__}) cannot "
            "resume: upgrade chargpt"
        )
    return tensors, state


def rng_state(
    batch_states: dict[int, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random stream training may draw from (Python, numpy, torch CPU and CUDA, and the
    batch generator of each micro-batch stream), as uint8 tensors plus a few scalars."""
    version, words, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {
        "rng.python": as_bytes(np.array(words, dtype=np.uint32)),
        "rng.numpy": as_bytes(keys),
        "rng.torch": torch.get_rng_state(),
        **{f"rng.batches.{k}": state for k, state in batch_states.items()},
    }
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    scalars = {"python": [version, gauss_next], "numpy": [pos, has_gauss, cached_gaussian]}
    return tensors, scalars


def set_rng_state(
    tensors: dict[str, torch.Tensor],
    scalars: dict[str, Any],
    batch_generators: dict[int, torch.Generator],
) -> None:
    """Undo `rng_state`: put every random stream back where it was."""
    version, gauss_next = scalars["python"]
    words = tuple(int(w) for w in from_bytes(tensors["rng.python"], np.uint32))
    random.setstate((version, words, gauss_next))
    pos, has_gauss, cached_gaussian = scalars["numpy"]
    keys = from_bytes(tensors["rng.numpy"], np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, cached_gaussian))
    torch.set_rng_state(tensors["rng.torch"])
    for stream, generator in batch_generators.items():
        generator.set_state(tensors[f"rng.batches.{stream}"])
    cuda_keys = [f"rng.cuda.{i}" for i in range(torch.cuda.device_count())]
    if cuda_keys and all(k in tensors for k in cuda_keys):  # none when saved on another device
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda_keys])


def as_bytes(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).copy())


def from_bytes(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    return tensor.numpy().view(dtype).copy()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """AdamW's per-parameter moments as named tensors, and its param groups (plain JSON)."""
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{name}": torch.as_tensor(value).detach().to("cpu").contiguous()
        for index, moments in state["state"].items()
        for name, value in moments.items()
    }
    return tensors, state["param_groups"]


def optimizer_state_dict(tensors: dict[str, torch.Tensor], groups: list) -> dict[str, Any]:
    """Undo `optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete temporary files that a killed save left behind (see `atomic_write`)."""
    for tmp in Path(run_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
