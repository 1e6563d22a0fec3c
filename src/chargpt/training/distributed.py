"""Multi-process training on PyTorch's own engine: torchrun starts the processes, this module
joins them into a process group and reduces numbers across them.

The group maps each device to its backend, gloo for CPU tensors and NCCL for GPU tensors, so
that a collective on a CPU tensor (a loss total, a stop flag, random states) works while the
gradients go through NCCL. CPU-only PyTorch builds lack NCCL, and map the CPU alone.

A plain `chargpt train` is a world of one process, and every helper here is then a no-op.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from chargpt.errors import ChargptError
from chargpt.training.precision import TrainingPrecision


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE_PROCESS = World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend() -> str:
    """The device-to-backend map every process group of chargpt uses, on CPUs and GPUs alike."""
    return "cpu:gloo,cuda:nccl" if dist.is_nccl_available() else "cpu:gloo"


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (environment variables RANK, WORLD_SIZE, ...);
    on GPUs each process takes the GPU of its local rank."""
    if not launched_by_torchrun():
        return SINGLE_PROCESS, device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ChargptError(f"multi-process training runs on cpu or cuda, not {device.type}")
    if not dist.is_initialized():
        # DDP's constructor imports torch._dynamo, which, imported once the group exists, holds
        # on to it (torch 2.13): destroy_process_group then leaves gloo's threads running, and
        # one freeing a finished collective's tensors during interpreter shutdown aborts
        importlib.import_module("torch._dynamo")
        dist.init_process_group(backend=backend())
    return World(rank, local_rank, size), device


def micro_batch_streams(grad_accum: int, world: World) -> range:
    """The micro-batch streams this process draws: an equal share of the `grad_accum` streams,
    so that N processes see the same batches as one process accumulating N times as many."""
    if grad_accum % world.size:
        raise ChargptError(
            f"--grad-accum {grad_accum} is not a multiple of the {world.size} processes: pass "
            f"--grad-accum {world.size * max(1, round(grad_accum / world.size))}"
        )
    share = grad_accum // world.size
    return range(world.rank * share, (world.rank + 1) * share)


def data_parallel(module: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """`module` wrapped so that backward() averages gradients over the processes (DDP); the
    module itself in a world of one."""
    if not world.distributed:
        return module
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def gradient_sync(forward: torch.nn.Module, now: bool) -> contextlib.AbstractContextManager:
    """Context for a backward pass: under DDP, gradients are exchanged only `now`, so that
    micro-batches accumulate locally and the processes talk once per step."""
    if isinstance(forward, DistributedDataParallel) and not now:
        return forward.no_sync()
    return contextlib.nullcontext()


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait until every process gets here; nothing in a world of one."""
    if world.distributed:
        dist.barrier()


def all_reduce(values: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a tensor over all processes; identity in a world of one."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return values


def from_rank0(values: torch.Tensor, world: World) -> torch.Tensor:
    """Rank 0's copy of a tensor, on every process; `values` itself in a world of one."""
    if world.distributed:
        dist.broadcast(values, src=0)
    return values


def agreed_precision(dtype: str, device: torch.device, world: World) -> TrainingPrecision:
    """The TrainingPrecision rank 0 measures, on every process: each process's own timings
    could fall either side of a choice, and then the processes would compute differently."""
    placeholder = TrainingPrecision(torch.float32, None, torch.float32)  # replaced by rank 0's
    mine = TrainingPrecision.measured(dtype, device) if world.is_main else placeholder
    return TrainingPrecision.from_codes(from_rank0(mine.to_codes(), world))


def all_gather(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every process's copy of a same-shaped tensor, in rank order."""
    if not world.distributed:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(out, tensor)
    return out
