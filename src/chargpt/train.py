"""Lab part i: the AdamW training loop, with loss estimates, samples and checkpoints."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from chargpt.checkpoint import save_run
from chargpt.config import ModelConfig, TrainConfig
from chargpt.data import CharDataset
from chargpt.device import autocast, resolve_device, resolve_dtype
from chargpt.models import LanguageModel, build_model
from chargpt.plot import plot_after_training
from chargpt.tokenizer import CharTokenizer


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
) -> dict[str, float]:
    """The lab's estimate: mean loss over `eval_iters` random batches per split, in eval mode.
    The windows come from their own seeded generator, so every estimate scores the same text."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = dataset.get_batch(split, batch_size, block_size, generator, device)
            with autocast(device, dtype):
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train(was_training)
    return out


def sample_text(
    model: LanguageModel, tokenizer: CharTokenizer, length: int, device: torch.device, seed: int
) -> str:
    """A short sample from a newline prompt, to watch the model learn."""
    start = tokenizer.stoi.get("\n", 0)
    idx = torch.tensor([[start]], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, length, generator=generator)
    model.train(was_training)
    return tokenizer.decode(out[0, 1:].tolist())


@dataclass
class TrainResult:
    model: LanguageModel
    best_val_loss: float
    best_step: int
    steps: int
    elapsed: float
    tokens_per_second: float


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
        log=print,
    ):
        self.model_config = model_config
        self.cfg = train_config
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.data_name = data_name
        self.log = log
        self.device = resolve_device(train_config.device)
        self.dtype = resolve_dtype(train_config.dtype, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(train_config.seed)  # one seed for init and dropout...
        self.batch_generator = torch.Generator().manual_seed(train_config.seed)  # ...one for data
        self.model = build_model(model_config, tokenizer.vocab_size).to(self.device)
        self.optimizer = configure_optimizer(self.model, train_config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, train_config)
        )
        self.forward = torch.compile(self.model) if train_config.compile else self.model
        self.step = 0
        self.best_val_loss = math.inf
        self.best_step = -1

    def train_step(self) -> float:
        """One AdamW update on a fresh random batch; returns the batch loss."""
        cfg = self.cfg
        x, y = self.dataset.get_batch(
            "train",
            cfg.batch_size,
            self.model_config.block_size,
            self.batch_generator,
            self.device,
        )
        with autocast(self.device, self.dtype):
            _, loss = self.forward(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item()

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
            data=self.data_name,
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def record(self, metrics: dict) -> None:
        with (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def checkpoint_if_best(self, losses: dict[str, float]) -> None:
        if losses["val"] < self.best_val_loss:
            self.best_val_loss, self.best_step = losses["val"], self.step
            self.save()

    def run(self) -> TrainResult:
        """Train for `max_iters` steps, estimating losses every `eval_interval` steps."""
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * self.model_config.block_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        train_time, window_start, window_steps = 0.0, time.perf_counter(), 0
        bar = tqdm(
            total=cfg.max_iters, initial=self.step, unit="step", dynamic_ncols=True, disable=None
        )
        while True:
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                window_time = time.perf_counter() - window_start
                train_time += window_time
                tokens_per_s = window_steps * tokens_per_step / window_time if window_steps else 0
                losses = self.evaluate()
                self.record(
                    {
                        "step": self.step,
                        "train_loss": losses["train"],
                        "val_loss": losses["val"],
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": tokens_per_s,
                        "elapsed": train_time,
                        "tokens": self.step * tokens_per_step,
                    }
                )
                bar.write(
                    f"step {self.step}: train loss {losses['train']:.4f}, "
                    f"val loss {losses['val']:.4f}"
                )
                self.checkpoint_if_best(losses)
                if cfg.sample_chars:
                    text = sample_text(
                        self.model, self.tokenizer, cfg.sample_chars, self.device, cfg.seed
                    )
                    bar.write(text.strip("\n") + "\n")
                window_start, window_steps = time.perf_counter(), 0
            if self.step >= cfg.max_iters:
                break
            loss = self.train_step()
            window_steps += 1
            bar.update(1)
            elapsed = time.perf_counter() - window_start
            bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{window_steps * tokens_per_step / elapsed:,.0f}"
            )
        bar.close()
        plot_after_training(self.out_dir)  # loss.png beside metrics.jsonl
        total_tokens = cfg.max_iters * tokens_per_step
        return TrainResult(
            self.model,
            self.best_val_loss,
            self.best_step,
            self.step,
            train_time,
            total_tokens / train_time if train_time else 0.0,
        )
