"""Start-up timings of a command's repeated work (`Work`) on this machine: one decode step and
the choice of the next ids, as `chargpt sample` repeats it, or one scoring window, as `chargpt
eval` does. They pick onnxruntime's session settings (`chargpt.export.runtime`) and tell whether
a backend or a quantization the user asked for is slower than fp32 PyTorch here (`slower_note`):
measured, never assumed from CPU flags."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from chargpt.generation.sampling import sample_next
from chargpt.model.cache import KVCache
from chargpt.model.gpt import GPTLanguageModel
from chargpt.model.timing import fastest_seconds

Job = Callable[[], object]


@dataclass(frozen=True)
class Work:
    """What a command repeats: `rows` sequences that each decode one character after half a
    block of cached positions and sample it (`chargpt sample`), or, `scoring`, `rows` windows of
    block_size positions read from position 0 (`chargpt eval`)."""

    rows: int = 1
    scoring: bool = False

    @property
    def unit(self) -> str:
        return "window" if self.scoring else "character"

    def past(self, block_size: int) -> int:
        """Positions cached before each timed step (none for a scoring window)."""
        return 0 if self.scoring else block_size // 2

    def length(self, block_size: int) -> int:
        """Positions each timed pass reads."""
        return block_size if self.scoring else 1


def sampled(work: Work, step: Callable[[], torch.Tensor]) -> Job:
    """`step` (which returns (rows, V) logits for the next ids) and the draw of one id per row
    at temperature 1, as `chargpt sample` runs them: PyTorch works between two steps."""
    generators = [torch.Generator().manual_seed(row) for row in range(work.rows)]
    return lambda: sample_next(step(), 1.0, 0, 1.0, generators)


def pytorch_job(model: GPTLanguageModel, work: Work) -> Job:
    """`work` once on a PyTorch GPT (fp32 or int8): a step after half a block of positions
    (zeros) and the draw of the next ids, or a scoring window."""
    c = model.config
    block, past = c.block_size, work.past(c.block_size)
    idx = torch.zeros(work.rows, work.length(block), dtype=torch.long)
    if work.scoring:
        return torch.inference_mode()(lambda: model.logits(idx))
    if not model.supports_kv_cache:  # the reference attention: the lab's loop reads it all again
        context = torch.zeros(work.rows, past + 1, dtype=torch.long)
        return sampled(work, torch.inference_mode()(lambda: model.logits(context)[:, -1]))
    shape = (work.rows, c.n_head, past, c.n_embd // c.n_head)
    caches = [KVCache(block) for _ in model.blocks]
    for cache in caches:
        cache.append(torch.zeros(shape), torch.zeros(shape))

    @torch.inference_mode()
    def step() -> torch.Tensor:
        for cache in caches:
            cache.length = past  # forget the last timed step: each one follows `past` positions
        return model.step(idx, caches)

    return sampled(work, step)


def slower_note(asked: str, job: Job, fp32_job: Job, work: Work) -> str | None:
    """One line saying that `asked` (a backend or a quantization) runs `work` slower than fp32
    PyTorch on this machine, with both timings, or None where it is at least as fast. Timed on
    the process's threads, as the command runs (a few tenths of a second at most)."""
    jobs = {asked: job, "fp32": fp32_job}
    seconds = fastest_seconds(jobs, repeats=3 if work.scoring else 5, threads=None)
    if seconds[asked] <= seconds["fp32"]:
        return None
    ms = {name: 1000 * s for name, s in seconds.items()}
    return (
        f"note: {asked} is slower than fp32 PyTorch on this machine ({ms[asked]:.1f} vs "
        f"{ms['fp32']:.1f} ms a {work.unit}, timed at start-up)"
    )
