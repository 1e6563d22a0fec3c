"""Lab part i: the AdamW training loop, with loss estimates, samples and checkpoints.

A run ends after `max_iters` steps or, with `max_time`, once its training steps have taken that
long: evaluations are not counted, and the time adds up over the sessions of a resumed run
(`train_time`). The cosine schedule then follows the elapsed fraction of the time, the last
evaluation comes when the time is up, and under torchrun the processes agree on the elapsed time
(the largest of theirs) every `log_interval` steps, so they share the schedule and the last step.
With `ema_decay`, evaluations, samples and the best checkpoint use the moving average of the
weights; last.safetensors keeps both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from chargpt.config import ModelConfig, TrainConfig, parse_duration
from chargpt.data.corpus import corpus_name
from chargpt.data.dataset import CharDataset
from chargpt.data.files import remove_stale_temporaries
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.generation.generate import generate
from chargpt.generation.precision import autocast, resolve_device, resolve_dtype
from chargpt.model import LanguageModel, build_model
from chargpt.runs.directory import save_run
from chargpt.runs.metrics import append_metrics, keep_metrics_up_to
from chargpt.training.distributed import (
    all_reduce,
    barrier,
    close_world,
    data_parallel,
    gradient_sync,
    init_world,
    micro_batch_streams,
)
from chargpt.training.estimate import estimate_loss, estimate_seed
from chargpt.training.optim import configure_optimizer, lr_scheduler
from chargpt.training.state import gather_rng_states, restore_trainer_state, save_trainer_state
from chargpt.viz.plot import plot_after_training


class TrainingDiverged(ChargptError):
    """The loss became NaN or infinite; the last good checkpoint stays on disk."""


def sample_text(model: LanguageModel, tokenizer: CharTokenizer, length: int, seed: int) -> str:
    """A short sample from an empty prompt (a newline), to watch the model learn (`generate`
    samples in eval mode and gives the model back in training mode)."""
    return generate(model, tokenizer, max_new_tokens=length, seed=seed)[0]


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
        out_dir: str | Path,
        data_name: str = "",
        data_sha256: str = "",
    ):
        self.model_config = model_config
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.data_name = corpus_name(data_name) if data_name else ""
        self.data_sha256 = data_sha256
        # under torchrun, join the other processes (a no-op for a plain `chargpt train`)
        self.world, self.device = init_world(resolve_device(train_config.device))
        # what is left to the start of the run is fixed now, and saved with it
        self.cfg = cfg = dataclasses.replace(
            train_config,
            grad_accum=train_config.grad_accum or self.world.size,  # one micro-batch a process
            lr_decay_iters=train_config.lr_decay_iters or train_config.max_iters,
        )
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(cfg.seed)  # one seed for init and dropout...
        # ...and one batch stream per micro-batch of a step; this process draws its share
        self.batch_generators = {
            stream: torch.Generator().manual_seed(cfg.seed + stream)
            for stream in micro_batch_streams(cfg.grad_accum, self.world)
        }
        self.model = build_model(model_config, tokenizer.vocab_size).to(self.device)
        if self.world.rank:  # same initial weights everywhere, but each drops out its own units
            torch.manual_seed(cfg.seed + self.world.rank)
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
            if cfg.ema_decay
            else None
        )
        self.time_limit = parse_duration(cfg.max_time) if cfg.max_time else 0.0  # seconds
        self.elapsed = 0.0  # training seconds when the last step ended, agreed by the processes
        self.optimizer = configure_optimizer(self.model, cfg)
        time_progress = (lambda: self.elapsed / self.time_limit) if self.time_limit else None
        self.scheduler = lr_scheduler(self.optimizer, cfg, time_progress)
        forward = torch.compile(self.model) if cfg.compile else self.model
        self.forward = data_parallel(forward, self.world, self.device)  # gradients averaged
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * model_config.block_size
        self.step = 0
        self.best_val_loss = math.inf
        self.best_step = -1
        self.last_eval_step = -1  # a resumed run does not estimate the losses of its step again
        self.saved_step = -1  # the step of last.safetensors on disk
        self.train_time = 0.0  # seconds spent in training steps, over all sessions of the run
        self.window_start = time.perf_counter()  # when training went on after an evaluation
        self.stop_signal: int | None = None

    def close(self) -> None:
        """Under torchrun, leave the process group. The DDP wrapper goes first: freed as the
        group's last owner, it would tear the group down holding the GIL, which gloo's threads
        may need at that moment (a deadlock seen with torch 2.13 on CPU)."""
        self.forward = self.model
        close_world()

    def train_step(self) -> torch.Tensor:
        """One AdamW update on `grad_accum` fresh random micro-batches (this process's share).
        Returns this process's part of the step's mean loss, left on the device (reading it
        waits for the device): summed over the processes, it is the step's mean loss."""
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
            with gradient_sync(self.forward, now=last):
                with autocast(self.device, self.dtype):
                    _, loss = self.forward(x, y)
                (loss / len(generators)).backward()  # gradients add up to the mean's
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        self.update_elapsed()  # before the schedule's step: a time budget paces it
        self.scheduler.step()
        return total / cfg.grad_accum

    def update_elapsed(self) -> None:
        """Training seconds so far, in `elapsed`. Under torchrun the processes agree on it (their
        largest) every `log_interval` steps and keep it in between, so that they follow one
        schedule and stop at one step."""
        now = self.train_time + time.perf_counter() - self.window_start
        if not self.world.distributed:
            self.elapsed = now
        elif self.step % self.cfg.log_interval == 0:
            self.elapsed = all_reduce(torch.tensor([now]), self.world, op="max").item()

    @property
    def eval_model(self) -> LanguageModel:
        """The weights that are evaluated, sampled and saved: their moving average, if kept."""
        return self.model if self.ema is None else self.ema.module

    def finished(self) -> bool:
        """Whether the run's steps, or with `max_time` its training time, are all done."""
        if self.time_limit:
            return self.elapsed >= self.time_limit
        return self.step >= self.cfg.max_iters

    def report_loss(self, bar: tqdm, losses: list[torch.Tensor], tokens_per_s: float) -> None:
        """Show the mean training loss of the steps since the last report. This waits for the
        device (and under torchrun, for the other processes) once per `log_interval` steps."""
        value = all_reduce(torch.stack(losses).mean(), self.world).item()
        if not math.isfinite(value):
            raise self.diverged("training loss", value)
        bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens_per_s:,.0f}")

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

    def save(self) -> None:
        """The best weights so far and config.json (see chargpt.runs.directory)."""
        dtype = str(self.dtype).removeprefix("torch.")
        meta = dict(step=self.step, best_val_loss=self.best_val_loss, best_step=self.best_step)
        meta.update(data=self.data_name, data_sha256=self.data_sha256, dtype=dtype)
        model = self.eval_model
        save_run(self.out_dir, model, self.tokenizer, self.model_config, self.cfg, **meta)

    def save_last(self) -> None:
        """The whole training state, for `train --resume` (see chargpt.training.state). Every
        process takes part (random states are gathered); the main one writes."""
        rngs = gather_rng_states(self.batch_generators, self.device, self.world)
        if self.world.is_main:
            save_trainer_state(self, rngs)
        self.saved_step = self.step

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Continue from a `save_last` state (from `load_trainer_state`), exactly as if training
        had never stopped."""
        restore_trainer_state(self, tensors, state)
        self.saved_step = self.step
        self.elapsed = self.train_time
        if self.world.is_main:  # one process tidies the run directory while the others wait
            keep_metrics_up_to(self.out_dir, self.step)  # later estimates will be redone
            remove_stale_temporaries(self.out_dir)
        barrier(self.world)

    def stop_requested(self) -> bool:
        """Whether a signal asked to stop. Processes agree on it every `log_interval` steps (one
        all-reduce), so that they all stop at the same step."""
        if not self.world.distributed:
            return self.stop_signal is not None
        if self.step % self.cfg.log_interval:
            return False
        flag = torch.tensor([self.stop_signal or 0])
        self.stop_signal = int(all_reduce(flag, self.world, op="max").item()) or None
        return self.stop_signal is not None

    def due_for_eval(self) -> bool:
        cfg = self.cfg
        due = self.step % cfg.eval_interval == 0 or self.finished()
        return due and self.step != self.last_eval_step

    def evaluate_and_save(self, bar: tqdm, tokens_per_s: float) -> None:
        """Estimate the losses, log them, keep the best weights and the resumable state."""
        cfg = self.cfg
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # leave the training random streams untouched
            windows = (cfg.batch_size, self.model_config.block_size, cfg.eval_iters)
            seed = estimate_seed(cfg.seed)  # the same windows every time, none training's
            model = self.eval_model
            losses = estimate_loss(
                model, self.dataset, *windows, self.device, self.dtype, seed, self.world
            )
            text = (
                sample_text(model, self.tokenizer, cfg.sample_chars, cfg.seed)
                if cfg.sample_chars and self.world.is_main
                else ""
            )
        for split, value in losses.items():
            if not math.isfinite(value):
                raise self.diverged(f"{split} loss estimate", value)
        if losses["val"] < self.best_val_loss:
            self.best_val_loss, self.best_step = losses["val"], self.step
            if self.world.is_main:
                self.save()
        if self.world.is_main:
            record = {"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"]}
            record.update(lr=self.scheduler.get_last_lr()[0], tokens_per_s=tokens_per_s)
            record.update(elapsed=self.train_time, tokens=self.step * self.tokens_per_step)
            append_metrics(self.out_dir, record)
            bar.write(
                f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            )
        self.last_eval_step = self.step
        self.save_last()
        if text:
            bar.write(text.strip("\n") + "\n")

    def run(self) -> TrainResult:
        """Train up to `max_iters` steps (or for `max_time`), estimating losses every
        `eval_interval` steps and at the end. SIGINT or SIGTERM stops it after the current step
        (under torchrun, at the next multiple of `log_interval`), with the state saved for
        `train --resume`."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        start_step, start_time = self.step, self.train_time
        self.window_start, window_steps = time.perf_counter(), 0  # since the last estimate
        losses: list[torch.Tensor] = []  # this process's step losses since the last report
        bar = tqdm(
            total=None if self.time_limit else cfg.max_iters,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=None if self.world.is_main else True,  # one progress bar, not one a process
        )
        with stop_on_signals(self):
            while True:
                stopping = not self.finished() and self.stop_requested()
                evaluating = self.due_for_eval()
                seconds = time.perf_counter() - self.window_start
                tokens_per_s = window_steps * self.tokens_per_step / seconds if window_steps else 0
                if losses and (stopping or evaluating or self.step % cfg.log_interval == 0):
                    self.report_loss(bar, losses, tokens_per_s)  # stops on a NaN or inf loss
                    losses = []
                if evaluating or stopping:
                    self.train_time += seconds
                    if evaluating:
                        self.evaluate_and_save(bar, tokens_per_s)  # saves the state too
                    else:  # finish here: save, and let the caller report
                        self.save_last()
                    self.window_start, window_steps = time.perf_counter(), 0
                if stopping or self.finished():
                    break
                losses.append(self.train_step())
                window_steps += 1
                bar.update(1)
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
            (self.step - start_step) * self.tokens_per_step / session_time if session_time else 0.0,
            stopped_by=None if self.finished() else self.stop_signal,
        )
