"""Scoring a model on held-out text: the lab's random-window estimate and a deterministic full pass.

The lab estimates the validation loss as the mean over `eval_iters` random batches of windows.
That is cheap, but it is noisy, it may score some characters twice and others never, and the first
characters of every window are predicted from almost no context.

The full pass scores every validation character exactly once, each from a long context:

* windows of `block_size` input characters advance by `stride` (default `block_size // 2`);
* the first window scores all its positions, every later window only its last `stride` positions
  (the characters it adds), so each character is scored once;
* the last `block_size` characters of the training text are the context of the first validation
  characters (the split is one contiguous text), so even the first validation character is scored
  with a full window behind it.

Every validation character is therefore predicted from between `block_size - stride + 1` and
`block_size` characters of context. `stride = 1` gives each one the full `block_size` context (the
most the model allows) at `block_size` times the cost; `block_size // 2` costs two forward passes
per window's worth of text and keeps at least half the context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from chargpt.data.dataset import CharDataset, JoinedTokens, Tokens
from chargpt.errors import ChargptError
from chargpt.model import LanguageModel, eval_mode
from chargpt.model.precision import autocast, forward_dtype
from chargpt.runs.directory import Run
from chargpt.training.estimate import estimate_loss, estimate_seed


@dataclass(frozen=True)
class Loss:
    """A mean cross-entropy in nats per character, with the two other ways of saying it."""

    nats: float

    @property
    def bits_per_char(self) -> float:
        return self.nats / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats)

    def to_dict(self) -> dict[str, float]:
        return {
            "loss": self.nats,
            "bits_per_char": self.bits_per_char,
            "perplexity": self.perplexity,
        }


def full_pass_windows(
    n_tokens: int, block_size: int, start: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """The full pass's plan for scoring tokens[start:] of a sequence of `n_tokens`.

    Returns `starts` and `first_scored`: window w reads inputs tokens[starts[w] : starts[w] + T]
    (T = min(block_size, n_tokens - 1)), predicts tokens[starts[w] + 1 : starts[w] + T + 1], and
    scores its positions j >= first_scored[w]. Every target in [start, n_tokens) is scored once.
    """
    if not 1 <= start < n_tokens:
        raise ValueError(f"start must be in [1, {n_tokens}), got {start}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    T = min(block_size, n_tokens - 1)
    # each window scores the targets [lo, end): the first up to a whole window, then `stride` more
    first_end = min(n_tokens, max(start + stride, T + 1))
    ends = np.array([*range(first_end, n_tokens, stride), n_tokens])
    los = np.concatenate([[start], ends[:-1]])
    starts = ends - 1 - T  # the window's last input is the token just before its last target
    return starts, los - starts - 1


@torch.no_grad()
def full_pass_loss(
    model: LanguageModel,
    tokens: Tokens,
    block_size: int,
    start: int = 1,
    stride: int | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[float, int]:
    """Mean loss in nats over tokens[start:], each predicted from the tokens before it (at most
    `block_size` of them, at least `block_size - stride + 1` where the text allows), and how many
    tokens were scored. Windows are batched `batch_size` at a time; each batch reads one
    contiguous span of `tokens`."""
    stride = stride or max(1, block_size // 2)
    starts, first_scored = full_pass_windows(len(tokens), block_size, start, stride)
    T = min(block_size, len(tokens) - 1)
    offsets = np.arange(T + 1)
    device = torch.device(device)
    total, count = 0.0, 0
    with eval_mode(model):
        for b in range(0, len(starts), batch_size):
            batch_starts = starts[b : b + batch_size]  # increasing
            span = np.asarray(tokens[batch_starts[0] : batch_starts[-1] + T + 1])
            windows = span[(batch_starts - batch_starts[0])[:, None] + offsets]  # (B, T+1)
            windows = torch.from_numpy(windows.astype(np.int64)).to(device)
            x, y = windows[:, :-1], windows[:, 1:]  # inputs and next-character targets, (B, T)
            with autocast(device, dtype):
                logits = model.logits(x)  # (B, T, V)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
            first = torch.from_numpy(first_scored[b : b + batch_size]).to(device)
            scored = torch.arange(T, device=device)[None, :] >= first[:, None]  # (B, T)
            total += losses.view_as(scored)[scored].sum().item()
            count += int(scored.sum().item())
    return total / count, count


def validation_stream(
    dataset: CharDataset, block_size: int, max_chars: int | None = None
) -> tuple[JoinedTokens, int]:
    """The validation split (its first `max_chars` characters, if given) preceded by up to
    `block_size` training characters of context, and the index of the first validation
    character in it."""
    context = np.asarray(dataset.train[-block_size:])
    val = dataset.val if max_chars is None else dataset.val[:max_chars]
    return JoinedTokens(context, val), len(context)


@dataclass
class Evaluation:
    """One model scored on one dataset by both methods."""

    estimate_train: Loss  # the lab's estimate: mean over random windows of the training split
    estimate_val: Loss  # ... and of the validation split
    full_val: Loss  # every validation character scored once (see the module docstring)
    characters: int  # validation characters the full pass scored
    windows: int  # random windows behind each estimate
    block_size: int
    stride: int

    def summary(self) -> str:
        """Two human-readable lines: the full pass, then the lab's estimate."""
        full, est = self.full_val, self.estimate_val
        return (
            f"val loss {full.nats:.4f} nats/char | {full.bits_per_char:.4f} bits/char | "
            f"perplexity {full.perplexity:.3f}  (full pass: {self.characters:,} characters, "
            f"windows of {self.block_size} advancing by {self.stride})\n"
            f"lab estimate: val {est.nats:.4f}, train {self.estimate_train.nats:.4f} nats/char  "
            f"({self.windows:,} random windows of {self.block_size} per split)"
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("estimate_train", "estimate_val", "full_val"):
            out[name] = getattr(self, name).to_dict()
        return out


def evaluate(
    model: LanguageModel,
    dataset: CharDataset,
    block_size: int,
    batch_size: int,
    eval_iters: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    stride: int | None = None,
    max_chars: int | None = None,
) -> Evaluation:
    """The lab's estimate (windows seeded `seed`) and the full pass (over the first `max_chars`
    validation characters, if given)."""
    estimate = estimate_loss(
        model, dataset, batch_size, block_size, eval_iters, device, dtype, seed=seed
    )
    stride = stride or max(1, block_size // 2)
    tokens, start = validation_stream(dataset, block_size, max_chars)
    full, characters = full_pass_loss(
        model, tokens, block_size, start, stride, batch_size, device, dtype
    )
    return Evaluation(
        estimate_train=Loss(estimate["train"]),
        estimate_val=Loss(estimate["val"]),
        full_val=Loss(full),
        characters=characters,
        windows=eval_iters * batch_size,
        block_size=block_size,
        stride=stride,
    )


def evaluate_run(
    run: Run,
    dataset: CharDataset,
    device: torch.device,
    batch_size: int | None = None,
    eval_iters: int | None = None,
    stride: int | None = None,
    max_chars: int | None = None,
) -> Evaluation:
    """Score a loaded run on a dataset (split as in training); unset options come from the run.
    The lab's estimate scores the windows the training run's estimates scored."""
    block_size = run.model_config.block_size
    batch_size = run.train_config.batch_size if batch_size is None else batch_size
    eval_iters = run.train_config.eval_iters if eval_iters is None else eval_iters
    stride = max(1, block_size // 2) if stride is None else stride
    if batch_size < 1 or eval_iters < 1:
        raise ChargptError("--batch-size and --eval-iters must be at least 1")
    if not 1 <= stride <= block_size:
        raise ChargptError(
            f"--stride must be between 1 and block_size ({block_size}), got {stride}"
        )
    if max_chars is not None and max_chars < 1:
        raise ChargptError(f"--max-chars must be at least 1, got {max_chars}")
    dataset.check_block_size(block_size)
    dtype = forward_dtype(run.model, run.train_config.dtype, device)  # fp32 for int8
    seed = estimate_seed(run.train_config.seed)
    return evaluate(
        run.model,
        dataset,
        block_size,
        batch_size,
        eval_iters,
        device,
        dtype,
        seed,
        stride,
        max_chars,
    )
