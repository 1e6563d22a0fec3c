"""Lab part i's loss estimate: the mean loss over random batches of each split, taken every
`eval_interval` steps while training (and by `chargpt eval` beside its full pass), with a short
sample to watch the model learn."""

from __future__ import annotations

import torch

from chargpt.config import TrainConfig
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.generation.generate import generate
from chargpt.model import LanguageModel, eval_mode
from chargpt.model.precision import autocast
from chargpt.training.distributed import SINGLE_PROCESS, World, all_reduce


def estimate_seed(seed: int) -> int:
    """The seed of the lab estimate's windows, for a run seeded `seed`. Training's micro-batch
    streams count up from `seed` (chargpt.training.trainer), so the estimate counts down: it
    never scores the batches training draws, however many micro-batches a step has."""
    return seed - 1


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
    The windows come from their own generator seeded `seed`, so every estimate scores the same
    text. Over several processes, process r scores batches r, r + size, ... and the sums are
    reduced, which gives the single-process figure."""
    totals = torch.zeros(2, dtype=torch.float64)
    with eval_mode(model):
        for i, split in enumerate(("train", "val")):
            generator = torch.Generator().manual_seed(seed)
            for k in range(eval_iters):
                mine = k % world.size == world.rank
                # every process draws every batch, so that the windows are one process's; only
                # its own batches go to the device
                x, y = dataset.get_batch(
                    split, batch_size, block_size, generator, device if mine else "cpu"
                )
                if not mine:
                    continue
                with autocast(device, dtype):
                    _, loss = model(x, y)
                totals[i] += loss.item()
    train, val = (all_reduce(totals, world) / eval_iters).tolist()
    return {"train": train, "val": val}


def estimate_and_sample(
    model: LanguageModel,
    dataset: CharDataset,
    tokenizer: CharTokenizer,
    block_size: int,
    cfg: TrainConfig,
    sample_chars: int,
    device: torch.device,
    dtype: torch.dtype,
    world: World = SINGLE_PROCESS,
) -> tuple[dict[str, float], str]:
    """What training looks at every `eval_interval` steps: the lab estimate of run `cfg` and
    a sample of `sample_chars` characters from an empty prompt (a newline). Every random stream,
    training's included, is left as it was."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        windows = (cfg.batch_size, block_size, cfg.eval_iters)
        seed = estimate_seed(cfg.seed)  # the same windows every time, none training's
        losses = estimate_loss(model, dataset, *windows, device, dtype, seed, world)
        text = (
            generate(model, tokenizer, max_new_tokens=sample_chars, seed=cfg.seed)[0]
            if sample_chars
            else ""
        )
    return losses, text
