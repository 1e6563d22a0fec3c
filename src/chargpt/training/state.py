"""The resumable training state, `last.safetensors` in a run directory.

One file holds everything `train --resume` needs to go on exactly as if training had never
stopped: the weights (and their moving average, with `ema_decay`), the optimiser's state
(AdamW's moments, Muon's momentum) and every random stream training draws from, as tensors,
with the trainer's scalars (step, best val loss, schedule, configs) as JSON in the same file's
header, so that one rename replaces all of it at once.

The random streams are the generator of each micro-batch stream and, for each process, torch's
global generators (dropout): on the CPU, and on the process's GPU. Python's and numpy's global
generators are left alone: training never draws from them, and a host application's own use of
them must not be reset by a resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from chargpt import __version__
from chargpt.data.files import atomic_write
from chargpt.errors import ChargptError
from chargpt.runs.directory import (
    FORMAT_VERSION,
    LAST,
    cpu_state,
    header_json,
    load_weights,
    read_safetensors,
)
from chargpt.training.distributed import World, all_gather

if TYPE_CHECKING:
    from chargpt.training.trainer import Trainer

STATE_KEY = "trainer_state"  # last.safetensors header entry: JSON of the trainer's scalars


# the trainer's counters, and their types
COUNTERS = {
    "step": int,
    "best_val_loss": float,
    "best_step": int,
    "last_eval_step": int,
    "train_time": float,
}


def save_trainer_state(trainer: Trainer, rng_tensors: dict[str, torch.Tensor]) -> None:
    """Write the trainer's whole resumable state (with every process's random states, from
    `gather_rng_states`) as one file, so that it is replaced in one rename."""
    optimizer, groups = optimizer_tensors(trainer.optimizer)
    state = {name: getattr(trainer, name) for name in COUNTERS}
    state.update(
        model=dataclasses.asdict(trainer.model_config),
        train=dataclasses.asdict(trainer.cfg),
        scheduler=trainer.scheduler.state_dict(),
        optimizer_groups=groups,
    )
    tensors = {**model_tensors(trainer.model), **optimizer, **rng_tensors}
    if trainer.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in cpu_state(trainer.ema).items()})
    header = {"format": "pt", STATE_KEY: json.dumps({"format_version": FORMAT_VERSION, **state})}
    atomic_write(trainer.out_dir / LAST, lambda tmp: save_file(tensors, str(tmp), header))


def restore_trainer_state(
    trainer: Trainer, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Put a saved state into `trainer`: weights, AdamW moments, schedule, counters and this
    process's random streams."""
    path = trainer.out_dir / LAST
    load_weights(trainer.model, model_state_dict(tensors), path)
    try:
        trainer.optimizer.load_state_dict(optimizer_state_dict(tensors, state["optimizer_groups"]))
        if trainer.ema is not None:
            prefix = "ema."
            ema = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            trainer.ema.load_state_dict(ema)
        trainer.scheduler.load_state_dict(state["scheduler"])
        set_rng_states(tensors, trainer.batch_generators, trainer.device, trainer.world.rank)
        for name, kind in COUNTERS.items():
            setattr(trainer, name, kind(state[name]))
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ChargptError(
            f"{path} is incomplete or does not match this run ({type(err).__name__}: "
            f"{err}): it cannot be resumed; start a new run"
        ) from None


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


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in cpu_state(model).items()}


def model_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo `model_tensors`."""
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


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


def process_rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's global torch generators: the CPU's, and its GPU's when it trains on one."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def gather_rng_states(
    batch_generators: dict[int, torch.Generator], device: torch.device, world: World
) -> dict[str, torch.Tensor]:
    """Every random stream of every process, by name. Every process must call it (it gathers)."""
    mine = torch.stack([g.get_state() for g in batch_generators.values()])
    batch_states = torch.cat(all_gather(mine, world))  # streams in order 0..grad_accum-1
    tensors = {f"rng.batches.{k}": state for k, state in enumerate(batch_states)}
    for name, state in process_rng_states(device).items():
        for rank, rank_state in enumerate(all_gather(state, world)):
            tensors[f"rng.rank{rank}.{name}"] = rank_state
    return tensors


def set_rng_states(
    tensors: dict[str, torch.Tensor],
    batch_generators: dict[int, torch.Generator],
    device: torch.device,
    rank: int,
) -> None:
    """Undo `gather_rng_states` for this process: its batch streams and its own generators.
    A process the saved run did not have keeps the generators it was seeded with."""
    for stream, generator in batch_generators.items():
        generator.set_state(tensors[f"rng.batches.{stream}"])
    if rank == 0 and "rng.torch" in tensors:  # saved before each process's states were kept
        torch.set_rng_state(tensors["rng.torch"])
    if f"rng.rank{rank}.torch" in tensors:
        torch.set_rng_state(tensors[f"rng.rank{rank}.torch"])
    if device.type == "cuda" and f"rng.rank{rank}.cuda" in tensors:  # none if saved on a CPU
        torch.cuda.set_rng_state(tensors[f"rng.rank{rank}.cuda"], device)
