"""The resumable training state, `last.safetensors` in a run directory.

One file holds everything `train --resume` needs to go on exactly as if training had never
stopped (a `Trainer.state_dict()`): the weights (and their moving average, with `ema_decay`),
the optimiser's state (AdamW's moments, Muon's momentum) and every random stream training draws
from, as tensors, with the trainer's scalars (step, best val loss, schedule, configs, fp16's
loss scale) as JSON in the same file's header, so that one rename replaces all of it at once.

The random streams are the generator of each micro-batch stream and, for each process, the
streams its dropout draws from (torch's global generators while a step runs): the CPU's, and
its GPU's when it trains on one. A trainer keeps them apart from the global generators the rest
of the program uses (`RandomStreams`), and Python's and numpy's generators are left alone:
training never draws from them, and a host application's own use of them must not be reset by a
resume.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

from chargpt.data.files import atomic_write
from chargpt.errors import ChargptError
from chargpt.runs.directory import (
    FORMAT_VERSION,
    LAST,
    cpu_tensors,
    format_version,
    header_json,
    read_safetensors,
)
from chargpt.training.distributed import World, all_gather

T = TypeVar("T")
STATE_KEY = "trainer_state"  # last.safetensors header entry: JSON of the trainer's scalars
# the trainer's counters, and their types
COUNTERS = {
    "step": int,
    "best_val_loss": float,
    "best_step": int,
    "last_eval_step": int,
    "train_time": float,
}


class RandomStreams:
    """Every random stream one training process draws from: a generator per micro-batch stream
    it draws (`batches`, seeded `seed + stream`) and the streams of its dropout (`dropout`, the
    CPU's and its accelerator's), which are torch's global generators while a step runs
    (`drawing_dropout`) and kept apart from the rest of the program's otherwise."""

    def __init__(self, seed: int, streams: range, rank: int, device: torch.device):
        self.seed, self.rank, self.device = seed, rank, device
        self.batches = {stream: torch.Generator().manual_seed(seed + stream) for stream in streams}
        # each process drops out its own units
        self.dropout = {"torch": torch.Generator().manual_seed(seed + rank).get_state()}
        if device.type != "cpu":
            accelerator = torch.Generator(device=device).manual_seed(seed + rank)
            self.dropout[device.type] = accelerator.get_state()

    def initialise(self, build: Callable[[], T]) -> T:
        """`build()` (the initial weights) with the CPU's generator seeded `seed`, the same for
        every process; the first process's dropout goes on from that stream."""
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(self.seed)
            built = build()
            if self.rank == 0:
                self.dropout["torch"] = torch.get_rng_state()
        return built

    @contextlib.contextmanager
    def drawing_dropout(self) -> Iterator[None]:
        """Run with torch's global generators set to the dropout streams, which go on from where
        the block left them; the caller's generators are as they were before, whatever happens."""
        module = torch.get_device_module(self.device) if self.device.type != "cpu" else None
        caller = torch.get_rng_state(), module.get_rng_state(self.device) if module else None
        try:
            torch.set_rng_state(self.dropout["torch"])
            if module is not None:
                module.set_rng_state(self.dropout[self.device.type], self.device)
            yield
            self.dropout["torch"] = torch.get_rng_state()
            if module is not None:
                self.dropout[self.device.type] = module.get_rng_state(self.device)
        finally:
            torch.set_rng_state(caller[0])
            if module is not None:
                module.set_rng_state(caller[1], self.device)

    def state_dict(self) -> dict[str, Any]:
        batches = {stream: generator.get_state() for stream, generator in self.batches.items()}
        return {"batches": batches, **self.dropout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Dropout streams missing from `state` (a process the saved run did not have, or one
        that trained on the CPU only) stay as seeded."""
        for stream, generator in self.batches.items():
            generator.set_state(state["batches"][stream])
        self.dropout.update({k: v for k, v in state.items() if k in self.dropout})


def save_trainer_state(path: Path, state: dict[str, Any], world: World) -> None:
    """Write a `Trainer.state_dict()` with every process's random streams as one file, replaced
    in one rename. Every process calls it (the streams are gathered); the main one writes."""
    optimizer = {
        f"optimizer.{part}.{index}.{name}": torch.as_tensor(value).detach().to("cpu").contiguous()
        for part, saved in state["optimizer"].items()
        for index, moments in saved["state"].items()
        for name, value in moments.items()
    }
    tensors = {**prefixed("model.", state["model"]), **optimizer, **gather_rngs(state, world)}
    if state["ema"] is not None:
        tensors.update(prefixed("ema.", state["ema"]))
    scalars = {name: state[name] for name in COUNTERS}
    scalars.update(model=state["model_config"], train=state["train_config"])
    groups = {part: saved["param_groups"] for part, saved in state["optimizer"].items()}
    scalars.update(optimizer_groups=groups, precision=state["precision"])
    scalars.update(grad_scaler=state["grad_scaler"])
    header = {"format": "pt", STATE_KEY: json.dumps({"format_version": FORMAT_VERSION, **scalars})}
    if world.is_main:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), header))


def load_trainer_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and scalars of `last.safetensors`, for `train --resume` (and `Trainer.restore`)."""
    path = Path(run_dir) / LAST
    if not path.is_file():
        raise ChargptError(
            f"run directory {str(run_dir)!r} has no {LAST}: it holds no resumable state "
            "(written by `chargpt train` at every evaluation); start a new run"
        )
    tensors, header = read_safetensors(path)
    scalars = header_json(path, header, STATE_KEY)
    if format_version(path, scalars.get("format_version")) == 1:
        with refused_if_mismatched(path):
            tensors, scalars = from_version_1(tensors, scalars)
    return tensors, scalars


def from_version_1(
    tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state of format version 1 in today's layout. Version 1 numbered AdamW's and Muon's
    parameters in one sequence (AdamW's first) with their groups in one list, and kept the
    LambdaLR's state; before a run kept every process's dropout stream, it kept one
    (`rng.torch`), and before `lr_decay_iters` existed, the decay ended at `max_iters`."""
    tensors, scalars = dict(tensors), dict(scalars)
    parts: dict[str, list[dict[str, Any]]] = {}
    renumbered: dict[int, str] = {}  # old index -> "part.new index"
    for group in scalars.pop("optimizer_groups"):
        part = "muon" if "ns_steps" in group else "adamw"
        start = sum(len(g["params"]) for g in parts.get(part, []))
        renumbered.update({old: f"{part}.{start + i}" for i, old in enumerate(group["params"])})
        params = list(range(start, start + len(group["params"])))
        parts.setdefault(part, []).append({**group, "params": params})
    for key in [k for k in tensors if k.startswith("optimizer.")]:
        _, index, name = key.split(".", 2)
        tensors[f"optimizer.{renumbered[int(index)]}.{name}"] = tensors.pop(key)
    if "rng.torch" in tensors:
        tensors["rng.rank0.torch"] = tensors.pop("rng.torch")
    train = dict(scalars["train"])
    train["lr_decay_iters"] = train.get("lr_decay_iters") or train["max_iters"]
    scalars.pop("scheduler", None)
    scalars.update(optimizer_groups=parts, train=train, format_version=FORMAT_VERSION)
    return tensors, scalars


def trainer_state_dict(
    tensors: dict[str, torch.Tensor], scalars: dict[str, Any], rank: int
) -> dict[str, Any]:
    """Undo `save_trainer_state` for process `rank`: a `Trainer.state_dict()`. A process the
    saved run did not have gets no dropout streams (it keeps those it was seeded with)."""
    optimizer = {
        part: {"state": {}, "param_groups": groups}
        for part, groups in scalars["optimizer_groups"].items()
    }
    for key, value in unprefixed("optimizer.", tensors).items():
        part, index, name = key.split(".", 2)
        optimizer[part]["state"].setdefault(int(index), {})[name] = value
    ema = unprefixed("ema.", tensors)
    state = {name: kind(scalars[name]) for name, kind in COUNTERS.items()}
    state.update(
        model_config=scalars["model"],
        train_config=scalars["train"],
        model=unprefixed("model.", tensors),
        ema=ema or None,
        optimizer=optimizer,
        grad_scaler=scalars.get("grad_scaler", {}),  # a run saved before fp16 training had none
        rng={"batches": {int(k): v for k, v in unprefixed("rng.batches.", tensors).items()}},
    )
    state["rng"].update(unprefixed(f"rng.rank{rank}.", tensors))
    return state


@contextlib.contextmanager
def refused_if_mismatched(path: Path) -> Iterator[None]:
    """Loading the state of `path` into a trainer fails with a one-line error if it is
    incomplete or does not fit the trainer's model or optimiser."""
    try:
        yield
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        lines = str(err).strip().splitlines() or [""]
        raise ChargptError(
            f"{path} is incomplete or does not match config.json and this run "
            f"({type(err).__name__}: {lines[-1].strip()}): it cannot be resumed; start a new run"
        ) from None


def gather_rngs(state: dict[str, Any], world: World) -> dict[str, torch.Tensor]:
    """Every random stream of every process, by name. Every process must call it (it gathers)."""
    rng = dict(state["rng"])
    mine = torch.stack(list(rng.pop("batches").values()))
    batch_states = torch.cat(all_gather(mine, world))  # streams in order 0..grad_accum-1
    tensors = {f"rng.batches.{k}": stream for k, stream in enumerate(batch_states)}
    for name, stream in rng.items():
        for rank, rank_stream in enumerate(all_gather(stream, world)):
            tensors[f"rng.rank{rank}.{name}"] = rank_stream
    return tensors


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors ready for safetensors, named `prefix` + name."""
    return {prefix + name: tensor for name, tensor in cpu_tensors(state).items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo `prefixed`."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
