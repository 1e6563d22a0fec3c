"""Lab part i: the AdamW training loop, with loss estimates, samples and checkpoints.

A run ends after `max_iters` steps or, with `max_time`, when its training time is spent (see
chargpt.training.clock). With `ema_decay`, evaluations, samples and the best checkpoint use the
moving average of the weights; last.safetensors keeps both.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from chargpt.config import ModelConfig, TrainConfig, parse_duration
from chargpt.data.corpus import corpus_name
from chargpt.data.dataset import CharDataset
from chargpt.data.files import remove_stale_temporaries
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import LanguageModel, build_model
from chargpt.model.precision import autocast, resolve_device, tf32_matmuls
from chargpt.runs.directory import LAST, save_run
from chargpt.runs.metrics import append_metrics, keep_metrics_up_to
from chargpt.training.clock import TrainingClock
from chargpt.training.compiled import compiled_forward
from chargpt.training.distributed import (
    agreed_precision,
    all_reduce,
    barrier,
    close_world,
    data_parallel,
    gradient_sync,
    init_world,
    micro_batch_streams,
)
from chargpt.training.ema import ExponentialMovingAverage
from chargpt.training.estimate import estimate_and_sample
from chargpt.training.optim import configure_optimizer, lr_multiplier
from chargpt.training.outcome import TrainingDiverged, TrainResult, diverged, stop_on_signals
from chargpt.training.precision import TrainingPrecision
from chargpt.training.state import (
    RandomStreams,
    refused_if_mismatched,
    save_trainer_state,
    trainer_state_dict,
)
from chargpt.training.tensorboard import TensorBoardLog
from chargpt.viz.plot import plot_after_training


class Trainer:
    """Trains one model on one dataset and keeps its best-validation checkpoint in `out_dir`.
    It leaves torch's global state alone: the weights are initialised from `seed`, dropout draws
    from the trainer's own streams (see chargpt.training.state) and TF32 is on only in `run`."""

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        dataset: CharDataset,
        tokenizer: CharTokenizer,
        out_dir: str | Path,
        data_name: str = "",
        data_sha256: str = "",
        init_weights: dict[str, torch.Tensor] | None = None,
        precision: TrainingPrecision | None = None,
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
        # the dtypes rank 0 measures for all processes, or the resumed run's own
        self.precision = precision or agreed_precision(cfg.dtype, self.device, self.world)
        self.dtype = self.precision.autocast
        # one batch stream per micro-batch of a step (this process draws its share), dropout's
        streams = micro_batch_streams(cfg.grad_accum, self.world)
        self.random = RandomStreams(cfg.seed, streams, self.world.rank, self.device)
        build = partial(build_model, model_config, tokenizer.vocab_size)
        self.model = self.random.initialise(build).to(self.device)  # the same everywhere
        self.precision.apply(self.model)
        if init_weights is not None:  # fine-tuning: a trained run's (chargpt.training.finetune)
            self.model.load_state_dict(init_weights)
        self.ema = ExponentialMovingAverage(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * model_config.block_size
        time_limit = parse_duration(cfg.max_time) if cfg.max_time else 0.0  # seconds
        self.clock = TrainingClock(self.world, time_limit, cfg.log_interval, self.tokens_per_step)
        self.optimizer = configure_optimizer(self.model, cfg, self.precision.newton_schulz)
        # fp16 autocast scales the loss so that small gradients survive (a no-op otherwise)
        scaling = self.precision.scales_gradients
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaling)
        # with `compile`, compiled now (or the model itself, where compiling fails); the time
        # it takes is training time, charged when the run starts (see `run`)
        self.compile_seconds, self.uncharged_seconds = 0.0, 0.0
        forward = self.compile_model() if cfg.compile else self.model
        self.forward = data_parallel(forward, self.world, self.device)  # gradients averaged
        self.step, self.best_val_loss, self.best_step = 0, math.inf, -1
        self.last_eval_step = -1  # a resumed run does not estimate the losses of its step again
        self.saved_step = -1  # the step of last.safetensors on disk
        self.stop_signal: int | None = None
        self.tensorboard = TensorBoardLog()  # `run` opens it with --tensorboard

    def compile_model(self) -> torch.nn.Module:
        """The model compiled (see chargpt.training.compiled), with the time it took (the
        slowest process's, so that all share one schedule); or the model itself, where
        compiling fails, with one line saying so."""
        shape = (self.cfg.batch_size, self.model_config.block_size)
        forward, seconds, failure = compiled_forward(self.model, shape, self.precision)
        if failure and self.world.is_main:
            print(failure, file=sys.stderr)
        seconds = all_reduce(torch.tensor([seconds]), self.world, op="max").item()
        self.compile_seconds = self.uncharged_seconds = seconds
        return forward

    def close(self) -> None:
        """Under torchrun, leave the process group. The DDP wrapper goes first: freed as the
        group's last owner, it would tear the group down holding the GIL, which gloo's threads
        may need at that moment (a deadlock seen with torch 2.13 on CPU)."""
        self.forward = self.model
        close_world()

    def run(self) -> TrainResult:
        """Train up to `max_iters` steps (or for `max_time`), estimating losses every
        `eval_interval` steps and at the end. SIGINT or SIGTERM stops it after the current step
        (under torchrun, at the next multiple of `log_interval`), saved for `train --resume`."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        start_step, start_time = self.step, self.train_time
        total = None if self.clock.limit else self.cfg.max_iters
        quiet = None if self.world.is_main else True  # one progress bar, not one a process
        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, disable=quiet)
        losses: list[torch.Tensor] = []  # this process's step losses since the last report
        logs_to = self.out_dir if self.cfg.tensorboard and self.world.is_main else None
        self.tensorboard = TensorBoardLog(logs_to, self.saved_step)  # saved: a resumed run
        self.clock.charge(self.uncharged_seconds)  # compiling: spent before the run, for it
        self.uncharged_seconds = 0.0
        self.clock.start()
        with stop_on_signals(self.request_stop), tf32_matmuls(self.device), self.tensorboard:
            while True:
                # estimate the losses every eval_interval steps and at the end; keep the best
                if self.due_for_eval():
                    self.report_loss(bar, losses)  # stops on a NaN or inf loss
                    self.evaluate_and_save(bar, self.clock.stop())
                    self.clock.start()
                if self.finished() or self.stop_requested():
                    break
                # the schedule's rate, forward and backward, clip, update (see train_step)
                losses.append(self.train_step())
                bar.update(1)
                if self.step % self.cfg.log_interval == 0:
                    self.report_loss(bar, losses)
            if self.saved_step != self.step:  # stopped by a signal: save for `train --resume`
                self.report_loss(bar, losses)
                self.clock.stop()
                self.save_last()
        bar.close()
        if self.world.is_main:
            plot_after_training(self.out_dir)  # loss.png beside metrics.jsonl
        seconds = self.train_time - start_time
        tokens_per_s = (self.step - start_step) * self.tokens_per_step / seconds if seconds else 0
        stopped_by = None if self.finished() else self.stop_signal
        best = (self.best_val_loss, self.best_step)
        return TrainResult(self.model, *best, self.step, seconds, tokens_per_s, stopped_by)

    def train_step(self) -> torch.Tensor:
        """One update on `grad_accum` fresh random micro-batches (this process's share), at the
        schedule's rate. Returns this process's part of the step's mean loss, left on the
        device (reading it waits for the device): summed over the processes, the step's."""
        cfg = self.cfg
        self.optimizer.set_lr(self.lr_factor())  # the schedule's rate for this step
        self.optimizer.zero_grad(set_to_none=True)
        generators = list(self.random.batches.values())
        total = torch.zeros((), device=self.device)
        with self.random.drawing_dropout():
            for i, generator in enumerate(generators):
                x, y = self.dataset.get_batch(
                    "train", cfg.batch_size, self.model_config.block_size, generator, self.device
                )
                # processes exchange gradients only in the last micro-batch's backward pass
                with gradient_sync(self.forward, now=i == len(generators) - 1):
                    with autocast(self.device, self.dtype):
                        _, loss = self.forward(x, y)
                    # gradients add up to the mean's (times the loss scale, with fp16)
                    self.scaler.scale(loss / len(generators)).backward()
                total += loss.detach()
        if cfg.grad_clip > 0:
            self.optimizer.unscale(self.scaler)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step(self.scaler)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.clock.step_done(self.step)  # a time budget paces the next step's rate
        return total / cfg.grad_accum

    @property
    def train_time(self) -> float:
        """Seconds spent in training steps, over all sessions of the run."""
        return self.clock.train_time

    def lr_factor(self) -> float:
        """The schedule's factor of the next step's learning rates (see optim.lr_multiplier)."""
        progress = self.clock.progress if self.clock.limit else None
        return lr_multiplier(self.step, self.cfg, progress)

    @property
    def lr(self) -> float:
        """AdamW's learning rate for the next step (Muon's follows the same schedule)."""
        return self.cfg.learning_rate * self.lr_factor()

    @property
    def eval_model(self) -> LanguageModel:
        """The weights that are evaluated, sampled and saved: their moving average, if kept."""
        return self.model if self.ema is None else self.ema.module

    def finished(self) -> bool:
        """Whether the run's steps, or with `max_time` its training time, are all done."""
        if self.clock.limit:
            return self.clock.out_of_time()
        return self.step >= self.cfg.max_iters

    def due_for_eval(self) -> bool:
        due = self.step % self.cfg.eval_interval == 0 or self.finished()
        return due and self.step != self.last_eval_step

    def request_stop(self, signum: int) -> None:
        self.stop_signal = signum

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

    def report_loss(self, bar: tqdm, losses: list[torch.Tensor]) -> None:
        """Show the mean training loss of the steps since the last report and empty `losses`.
        This waits for the device (and under torchrun, for the other processes)."""
        if not losses:
            return
        value = all_reduce(torch.stack(losses).mean(), self.world).item()
        losses.clear()
        if not math.isfinite(value):
            raise self.diverged("training loss", value)
        tokens_per_s = self.clock.tokens_per_second()
        bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        rates = {name: opt.param_groups[0]["lr"] for name, opt in self.optimizer.parts.items()}
        self.tensorboard.training(self.step, value, rates, tokens_per_s)

    def diverged(self, what: str, value: float) -> TrainingDiverged:
        cfg = self.cfg
        args = (self.step, self.saved_step, self.out_dir, cfg.learning_rate, cfg.grad_clip)
        return diverged(what, value, *args)

    def evaluate_and_save(self, bar: tqdm, tokens_per_s: float) -> None:
        """Estimate the losses, log them, keep the best weights and the resumable state."""
        data = (self.dataset, self.tokenizer, self.model_config.block_size, self.cfg)
        sample_chars = self.cfg.sample_chars if self.world.is_main else 0
        where = (self.device, self.dtype, self.world)
        losses, text = estimate_and_sample(self.eval_model, *data, sample_chars, *where)
        for split, value in losses.items():
            if not math.isfinite(value):
                raise self.diverged(f"{split} loss estimate", value)
        if losses["val"] < self.best_val_loss:
            self.best_val_loss, self.best_step = losses["val"], self.step
            if self.world.is_main:
                self.save()
        if self.world.is_main:
            record = {"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"]}
            record.update(lr=self.lr, tokens_per_s=tokens_per_s)
            record.update(elapsed=self.train_time, tokens=self.step * self.tokens_per_step)
            append_metrics(self.out_dir, record)
            self.tensorboard.evaluation(self.step, losses, text)
            estimate = f"train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            bar.write(f"step {self.step}: {estimate}")
        self.last_eval_step = self.step
        self.save_last()
        if text:
            bar.write(text.strip("\n") + "\n")

    def save(self) -> None:
        """The best weights so far and config.json (see chargpt.runs.directory)."""
        meta = dict(step=self.step, best_val_loss=self.best_val_loss, best_step=self.best_step)
        meta.update(data=self.data_name, data_sha256=self.data_sha256)
        meta.update(dtype=str(self.dtype).removeprefix("torch."))
        configs = (self.tokenizer, self.model_config, self.cfg)
        save_run(self.out_dir, self.eval_model, *configs, **meta)

    def state_dict(self) -> dict[str, Any]:
        """Everything `load_state_dict` needs to go on exactly as if training had never stopped:
        counters, configs, weights (and their average), optimisers, the loss scale (fp16) and
        this process's random streams (the schedule follows from the step and the training
        time)."""
        return {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "last_eval_step": self.last_eval_step,
            "train_time": self.train_time,
            "model_config": dataclasses.asdict(self.model_config),
            "train_config": dataclasses.asdict(self.cfg),
            "precision": self.precision.to_json(),
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),  # empty without fp16
            "rng": self.random.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` (of this process's rank). The configs are the caller's
        to match (see chargpt.training.resume)."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state.get("grad_scaler"):  # fp16 then and now
            self.scaler.load_state_dict(state["grad_scaler"])
        self.random.load_state_dict(state["rng"])
        self.step, self.best_step = int(state["step"]), int(state["best_step"])
        self.best_val_loss = float(state["best_val_loss"])
        self.last_eval_step = int(state["last_eval_step"])
        self.clock.set(float(state["train_time"]))

    def save_last(self) -> None:
        """The whole training state, for `train --resume` (see chargpt.training.state). Every
        process takes part (random states are gathered); the main one writes."""
        save_trainer_state(self.out_dir / LAST, self.state_dict(), self.world)
        self.saved_step = self.step

    def restore(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        """Continue from the saved state of `load_trainer_state`, exactly as if training had
        never stopped."""
        with refused_if_mismatched(self.out_dir / LAST):
            self.load_state_dict(trainer_state_dict(tensors, scalars, self.world.rank))
        self.saved_step = self.step
        if self.world.is_main:  # one process tidies the run directory while the others wait
            keep_metrics_up_to(self.out_dir, self.step)  # later estimates will be redone
            remove_stale_temporaries(self.out_dir)
        barrier(self.world)
