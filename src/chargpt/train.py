"""Lab part i: the AdamW training loop, with loss estimates, samples and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from chargpt.checkpoint import (
    LAST,
    atomic_write_text,
    cpu_state,
    load_weights,
    optimizer_state_dict,
    optimizer_tensors,
    rng_state,
    save_run,
    save_trainer_state,
    set_rng_state,
)
from chargpt.config import ModelConfig, TrainConfig, from_dict, split_overrides
from chargpt.data import CharDataset
from chargpt.device import autocast, resolve_device, resolve_dtype
from chargpt.distributed import SINGLE_PROCESS, World, all_gather, all_reduce, init_world
from chargpt.errors import ChargptError
from chargpt.generate import generate
from chargpt.models import LanguageModel, build_model
from chargpt.plot import plot_after_training
from chargpt.tokenizer import CharTokenizer

# What `train --resume` may change: how long and how often, and where it runs. Everything else
# (model shape, data, optimiser, schedule, seed) is the run's identity and stays as saved.
RESUMABLE_OPTIONS = (
    "max_iters",
    "eval_interval",
    "eval_iters",
    "sample_chars",
    "device",
    "dtype",
    "compile",
)


class TrainingDiverged(ChargptError):
    """The loss became NaN or infinite; the last good checkpoint stays on disk."""


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `learning_rate`, then constant or cosine decay to `min_lr`."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return (cfg.min_lr + cosine * (cfg.learning_rate - cfg.min_lr)) / cfg.learning_rate


def configure_optimizer(model: LanguageModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not on biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2))


@torch.no_grad()
def estimate_loss(
    model: LanguageModel,
    dataset: CharDataset,
    batch_size: int,
    block_size: int,
    eval_iters: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    world: World = SINGLE_PROCESS,
) -> dict[str, float]:
    """The lab's estimate: mean loss over `eval_iters` random batches per split, in eval mode.
    The windows come from their own seeded generator, so every estimate scores the same text.
    Over several processes, process r scores batches r, r + size, ... and the sums are reduced,
    which gives the single-process figure."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for i, split in enumerate(("train", "val")):
        generator = torch.Generator().manual_seed(seed)
        for k in range(eval_iters):
            mine = k % world.size == world.rank
            # every process draws every batch, so that the windows are one process's; only its
            # own batches go to the device
            x, y = dataset.get_batch(
                split, batch_size, block_size, generator, device if mine else "cpu"
            )
            if not mine:
                continue
            with autocast(device, dtype):
                _, loss = model(x, y)
            totals[i] += loss.item()
    model.train(was_training)
    train, val = (all_reduce(totals, world) / eval_iters).tolist()
    return {"train": train, "val": val}


def sample_text(model: LanguageModel, tokenizer: CharTokenizer, length: int, seed: int) -> str:
    """A short sample from an empty prompt (a newline), to watch the model learn."""
    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, max_new_tokens=length, seed=seed)[0]
    finally:
        model.train(was_training)


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


def resume_configs(
    model_config: ModelConfig, train_config: TrainConfig, changes: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """The saved configs with the options a resumed run may change (RESUMABLE_OPTIONS) applied;
    any other option given with a different value is refused."""
    model_changes, train_changes = split_overrides(changes)
    new_model = from_dict(ModelConfig, {**dataclasses.asdict(model_config), **model_changes})
    new_train = from_dict(TrainConfig, {**dataclasses.asdict(train_config), **train_changes})
    refused = [
        "--" + f.name.replace("_", "-")
        for old, new in ((model_config, new_model), (train_config, new_train))
        for f in dataclasses.fields(old)
        if getattr(old, f.name) != getattr(new, f.name) and f.name not in RESUMABLE_OPTIONS
    ]
    if refused:
        allowed = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_OPTIONS)
        raise ChargptError(
            f"cannot change {', '.join(refused)} when resuming (a resumed run keeps its model "
            f"and training recipe; only {allowed} may change): start a new run with --out instead"
        )
    new_model.validate()
    new_train.validate()
    return new_model, new_train


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """While training, SIGINT and SIGTERM only set `trainer.stop_signal`: the loop then finishes
    its step, saves and stops, instead of dying in the middle of an update or a write."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def request_stop(signum: int, _frame: object) -> None:
        trainer.stop_signal = signum

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainResult:
    model: LanguageModel
    best_val_loss: float
    best_step: int
    steps: int
    elapsed: float
    tokens_per_second: float
    stopped_by: int | None = None  # the signal that stopped training early, if one did


class Trainer:
    """Trains one model on one dataset and keeps its best-validation checkpoint in `out_dir`."""

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        dataset: CharDataset,
        tokenizer: CharTokenizer,
        out_dir: Path,
        data_name: str = "",
        data_sha256: str = "",
    ):
        self.model_config = model_config
        self.cfg = train_config
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.data_name = data_name
        self.data_sha256 = data_sha256
        # under torchrun, join the other processes (a no-op for a plain `chargpt train`)
        self.world, self.device = init_world(resolve_device(train_config.device))
        self.dtype = resolve_dtype(train_config.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(train_config.seed)  # one seed for init and dropout...
        # ...and one batch stream per micro-batch of a step; this process draws its share
        self.batch_generators = {
            stream: torch.Generator().manual_seed(train_config.seed + stream)
            for stream in micro_batch_streams(train_config.grad_accum, self.world)
        }
        self.model = build_model(model_config, tokenizer.vocab_size).to(self.device)
        if self.world.rank:  # same initial weights everywhere, but each drops out its own units
            torch.manual_seed(train_config.seed + self.world.rank)
        self.optimizer = configure_optimizer(self.model, train_config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, train_config)
        )
        self.forward = torch.compile(self.model) if train_config.compile else self.model
        if self.world.distributed:  # averages gradients over processes in backward()
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.forward, device_ids=device_ids)
        self.step = 0
        self.best_val_loss = math.inf
        self.best_step = -1
        self.last_eval_step = -1  # a resumed run does not estimate the losses of its step again
        self.saved_step = -1  # the step of last.safetensors on disk
        self.train_time = 0.0  # seconds spent in training steps, over all sessions of the run
        self.stop_signal: int | None = None

    def train_step(self) -> float:
        """One AdamW update on `grad_accum` fresh random micro-batches (this process's share);
        returns their mean loss over all processes."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        generators = list(self.batch_generators.values())
        total = torch.zeros((), device=self.device)
        for i, generator in enumerate(generators):
            x, y = self.dataset.get_batch(
                "train", cfg.batch_size, self.model_config.block_size, generator, self.device
            )
            # processes exchange gradients only in the last micro-batch's backward pass
            last = i == len(generators) - 1
            with self.no_gradient_sync(unless=last):
                with autocast(self.device, self.dtype):
                    _, loss = self.forward(x, y)
                (loss / len(generators)).backward()  # gradients add up to the mean's
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        value = all_reduce(total / cfg.grad_accum, self.world).item()
        if not math.isfinite(value):
            raise self.diverged("training loss", value)
        return value

    def no_gradient_sync(self, unless: bool) -> contextlib.AbstractContextManager:
        if self.world.distributed and not unless:
            return self.forward.no_sync()
        return contextlib.nullcontext()

    def diverged(self, what: str, value: float) -> TrainingDiverged:
        """The error for a NaN or infinite loss; nothing is saved after it."""
        kept = (
            f"the last good state (step {self.saved_step}) is kept in {self.out_dir}"
            if self.saved_step >= 0
            else "nothing was saved"
        )
        clip = " or set --grad-clip 1.0" if self.cfg.grad_clip == 0 else ""
        return TrainingDiverged(
            f"training stopped at step {self.step}: the {what} is {value}; {kept}: start a new "
            f"run with a lower --learning-rate (now {self.cfg.learning_rate}){clip}"
        )

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        return estimate_loss(
            self.model,
            self.dataset,
            cfg.batch_size,
            self.model_config.block_size,
            cfg.eval_iters,
            self.device,
            self.dtype,
            seed=cfg.seed + 1,
            world=self.world,
        )

    def save(self) -> None:
        save_run(
            self.out_dir,
            self.model,
            self.tokenizer,
            self.model_config,
            self.cfg,
            step=self.step,
            best_val_loss=self.best_val_loss,
            best_step=self.best_step,
            data=self.data_name,
            data_sha256=self.data_sha256,
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def gather_batch_states(self) -> dict[int, torch.Tensor]:
        """The state of every micro-batch stream, from all processes."""
        local = torch.stack([g.get_state() for g in self.batch_generators.values()])
        gathered = torch.cat(all_gather(local, self.world))  # streams in order 0..grad_accum-1
        return dict(enumerate(gathered))

    def save_last(self) -> None:
        """The whole training state, for `train --resume`, replaced in one atomic rename.
        Every process takes part (the batch streams are gathered); the main one writes."""
        batch_states = self.gather_batch_states()
        if not self.world.is_main:
            return
        optimizer, groups = optimizer_tensors(self.optimizer)
        rngs, rng_scalars = rng_state(batch_states)
        weights = {f"model.{k}": v for k, v in cpu_state(self.model).items()}
        state = {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "last_eval_step": self.last_eval_step,
            "train_time": self.train_time,
            "model": dataclasses.asdict(self.model_config),
            "train": dataclasses.asdict(self.cfg),
            "scheduler": self.scheduler.state_dict(),
            "optimizer_groups": groups,
            "rng": rng_scalars,
        }
        save_trainer_state(self.out_dir, {**weights, **optimizer, **rngs}, state)
        self.saved_step = self.step

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Continue from a `save_last` state: weights, AdamW moments, schedule, counters and every
        random stream, so that training goes on exactly as if it had never stopped."""
        path = self.out_dir / LAST
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        load_weights(self.model, weights, path)
        try:
            self.optimizer.load_state_dict(optimizer_state_dict(tensors, state["optimizer_groups"]))
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(tensors, state["rng"], self.batch_generators)
            self.step, self.best_step = int(state["step"]), int(state["best_step"])
            self.best_val_loss = float(state["best_val_loss"])
            self.last_eval_step = int(state["last_eval_step"])
            self.train_time = float(state["train_time"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise ChargptError(
                f"{path} is incomplete or does not match this run ({type(err).__name__}: "
                f"{err}): it cannot be resumed; start a new run"
            ) from None
        self.saved_step = self.step
        # estimates logged after this state was saved are redone, so drop them
        atomic_write_text(self.metrics_path, self.metrics_text(up_to_step=self.step))

    def record(self, metrics: dict) -> None:
        """Add a line to metrics.jsonl, rewritten whole so that a crash never leaves half a line."""
        atomic_write_text(self.metrics_path, self.metrics_text() + json.dumps(metrics) + "\n")

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def metrics_text(self, up_to_step: float = math.inf) -> str:
        """metrics.jsonl's lines for steps up to `up_to_step`."""
        if not self.metrics_path.exists():
            return ""
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        return "".join(line for line in lines if json.loads(line)["step"] <= up_to_step)

    def checkpoint_if_best(self, losses: dict[str, float]) -> None:
        if losses["val"] < self.best_val_loss:
            self.best_val_loss, self.best_step = losses["val"], self.step
            if self.world.is_main:
                self.save()

    @property
    def tokens_per_step(self) -> int:
        """Training tokens in one optimisation step, over all processes."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.model_config.block_size

    def stop_requested(self) -> bool:
        """Whether a signal asked to stop; processes agree, so that they all stop together."""
        if self.world.distributed:
            flag = torch.tensor([self.stop_signal or 0])
            self.stop_signal = int(all_reduce(flag, self.world, op="max").item()) or None
        return self.stop_signal is not None

    def due_for_eval(self) -> bool:
        cfg = self.cfg
        due = self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters
        return due and self.step != self.last_eval_step

    def evaluate_and_save(self, bar: tqdm, tokens_per_s: float) -> None:
        """Estimate the losses, log them, keep the best weights and the resumable state."""
        cfg = self.cfg
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # leave the training random streams untouched
            losses = self.evaluate()
            text = (
                sample_text(self.model, self.tokenizer, cfg.sample_chars, cfg.seed)
                if cfg.sample_chars and self.world.is_main
                else ""
            )
        for split, value in losses.items():
            if not math.isfinite(value):
                raise self.diverged(f"{split} loss estimate", value)
        if self.world.is_main:
            self.record(
                {
                    "step": self.step,
                    "train_loss": losses["train"],
                    "val_loss": losses["val"],
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_per_s,
                    "elapsed": self.train_time,
                    "tokens": self.step * self.tokens_per_step,
                }
            )
            bar.write(
                f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            )
        self.checkpoint_if_best(losses)
        self.last_eval_step = self.step
        self.save_last()
        if text:
            bar.write(text.strip("\n") + "\n")

    def run(self) -> TrainResult:
        """Train up to `max_iters` steps, estimating losses every `eval_interval` steps. SIGINT or
        SIGTERM stops it after the current step, with the state saved for `train --resume`."""
        cfg = self.cfg
        tokens_per_step = self.tokens_per_step
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        start_step, start_time = self.step, self.train_time
        window_start, window_steps = time.perf_counter(), 0
        bar = tqdm(
            total=cfg.max_iters,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=None if self.world.is_main else True,  # one progress bar, not one a process
        )
        with stop_on_signals(self):
            while True:
                if self.due_for_eval():
                    window_time = time.perf_counter() - window_start
                    self.train_time += window_time
                    tokens = window_steps * tokens_per_step
                    self.evaluate_and_save(bar, tokens / window_time if window_steps else 0)
                    window_start, window_steps = time.perf_counter(), 0
                if self.step >= cfg.max_iters:
                    break
                if self.stop_requested():  # finish here: save, and let the caller report
                    self.train_time += time.perf_counter() - window_start
                    self.save_last()
                    break
                loss = self.train_step()
                window_steps += 1
                bar.update(1)
                elapsed = time.perf_counter() - window_start
                bar.set_postfix(
                    loss=f"{loss:.4f}", tok_s=f"{window_steps * tokens_per_step / elapsed:,.0f}"
                )
        bar.close()
        if self.world.is_main:
            plot_after_training(self.out_dir)  # loss.png beside metrics.jsonl
        session_time = self.train_time - start_time
        return TrainResult(
            self.model,
            self.best_val_loss,
            self.best_step,
            self.step,
            session_time,
            (self.step - start_step) * tokens_per_step / session_time if session_time else 0.0,
            stopped_by=self.stop_signal if self.step < cfg.max_iters else None,
        )
