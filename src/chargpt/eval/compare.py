"""Lab part j: the bigram baseline against the GPT, trained and scored alike, as a Markdown report.

Both models are trained on the same split with the same budget (`Trainer`, same training config),
scored by the same evaluator, sampled from the same prompt and seed, and set beside two
closed-form references computed from character counts: a unigram and a count-based bigram.
The trained bigram should land near the count-based bigram, which is the best any bigram can do
(up to smoothing); the GPT should land well below it.
"""

from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from pathlib import Path

import torch

from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.dataset import CharDataset
from chargpt.data.files import atomic_write_text
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.eval.counts import CountReference
from chargpt.eval.evaluate import Evaluation, evaluate_run
from chargpt.generation.generate import generate
from chargpt.runs.directory import Run, load_run, read_run_config
from chargpt.runs.metrics import read_metrics
from chargpt.training.trainer import Trainer
from chargpt.viz.plot import plot_comparison

REPORT = "report.md"
CURVES = "loss_curves.png"
MODELS = ("bigram", "gpt")
# A lookup table learns slowly at a transformer's learning rate: with the `cpu` preset's budget,
# peak 2e-3 leaves the bigram 0.15 nats above the count-based bigram, 1e-2 within 0.001
# (benchmarks/bigram_learning_rate.py). The default lets each model train to what it can reach.
BIGRAM_LEARNING_RATE = 1e-2


def check_new_comparison_dir(out: Path, run_names: tuple[str, ...]) -> None:
    """Never overwrite an earlier comparison: its report and runs stay as they are."""
    if out.exists() and not out.is_dir():
        raise ChargptError(f"--out {out} is a file: choose a directory path")
    taken = [p.name for p in (out / REPORT, *(out / name for name in run_names)) if p.exists()]
    if taken:
        raise ChargptError(
            f"{out} already holds a comparison ({', '.join(taken)}): choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ChargptError(f"cannot create --out {out} ({err.strerror}): choose another") from None


def label_runs(run_dirs: list[Path]) -> dict[str, Path]:
    """Name each run by its model family, or by its directory when both are of one family."""
    kinds = [read_run_config(d)["model"].get("model", "gpt") for d in run_dirs]
    labels = kinds if len(set(kinds)) == len(kinds) else [str(d) for d in run_dirs]
    if len(set(labels)) < len(labels):
        raise ChargptError("--runs names the same run twice: pass two different runs")
    return dict(zip(labels, map(Path, run_dirs), strict=True))


def with_learning_rate(config: TrainConfig, learning_rate: float) -> TrainConfig:
    """The same schedule shape at another peak: min_lr keeps its ratio to the peak."""
    ratio = config.min_lr / config.learning_rate
    return dataclasses.replace(config, learning_rate=learning_rate, min_lr=learning_rate * ratio)


def train_both(
    dataset: CharDataset,
    tokenizer: CharTokenizer,
    data_name: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    out: Path,
    bigram_learning_rate: float | None = BIGRAM_LEARNING_RATE,
    log=print,
) -> dict[str, Path]:
    """Train the bigram and the GPT on `dataset` with the same training config and budget (steps
    or `max_time`), into out/bigram and out/gpt; the bigram at its own peak learning rate (None:
    the GPT's), with min_lr scaled alike. Returns the run directories by model name."""
    dataset.check_block_size(model_config.block_size)
    runs = {}
    for name in MODELS:
        config = dataclasses.replace(model_config, model=name)
        train = train_config
        if name == "bigram" and bigram_learning_rate is not None:
            train = with_learning_rate(train, bigram_learning_rate)
        trainer = Trainer(config, train, dataset, tokenizer, out / name, data_name)
        log(f"training {name} ({trainer.model.num_parameters():,} parameters) into {out / name}")
        trainer.run()
        runs[name] = out / name
    return runs


@dataclass
class ModelResult:
    """One trained model in the comparison."""

    label: str
    run_dir: Path
    parameters: int
    steps: int
    tokens: int
    train_seconds: float
    best_step: int
    learning_rate: float
    evaluation: Evaluation
    sample: str


def sample_from(run: Run, prompt: str, length: int, seed: int) -> str:
    """`prompt` and `length` characters after it, sampled with `seed`."""
    return prompt + generate(run.model, run.tokenizer, prompt, max_new_tokens=length, seed=seed)[0]


def assess_run(
    label: str,
    run_dir: Path,
    dataset: CharDataset,
    tokenizer: CharTokenizer,
    device: torch.device,
    prompt: str,
    sample_chars: int,
    seed: int,
    stride: int | None = None,
) -> ModelResult:
    """Evaluate a run's best checkpoint on `dataset` (encoded by `tokenizer`) and sample from it."""
    run = load_run(run_dir, device)
    if run.tokenizer != tokenizer:
        raise ChargptError(
            f"{run_dir} was trained on another vocabulary than this data's: pass its --data"
        )
    last = read_metrics(run_dir)[-1]
    return ModelResult(
        label=label,
        run_dir=Path(run_dir),
        parameters=run.model.num_parameters(),
        steps=last["step"],
        tokens=last.get("tokens", 0),
        train_seconds=last.get("elapsed", 0.0),
        best_step=run.meta.get("step", last["step"]),
        learning_rate=run.train_config.learning_rate,
        evaluation=evaluate_run(run, dataset, device, stride=stride),
        sample=sample_from(run, prompt, sample_chars, seed),
    )


def results_table(results: list[ModelResult], references: list[CountReference]) -> str:
    header = (
        "| model | parameters | steps | tokens seen | train time | train loss | "
        "val loss (lab estimate) | val loss (full pass) | bits/char | perplexity |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    rows = []
    for r in results:
        ev = r.evaluation
        rows.append(
            f"| **{r.label}** | {r.parameters:,} | {r.steps:,} | {r.tokens:,} | "
            f"{r.train_seconds:.1f} s | {ev.estimate_train.nats:.4f} | "
            f"{ev.estimate_val.nats:.4f} | "
            f"**{ev.full_val.nats:.4f}** | {ev.full_val.bits_per_char:.3f} | "
            f"{ev.full_val.perplexity:.2f} |"
        )
    for ref in references:
        rows.append(
            f"| {ref.label} (closed form, add-one) | {ref.table_size:,} counts | — | — | — | "
            f"{ref.train.nats:.4f} | — | {ref.val.nats:.4f} | {ref.val.bits_per_char:.3f} | "
            f"{ref.val.perplexity:.2f} |"
        )
    return header + "\n".join(rows) + "\n"


def samples_table(results: list[ModelResult]) -> str:
    """The samples side by side: an HTML table, which GitHub renders inside Markdown."""
    heads = "".join(f"<th>{html.escape(r.label, quote=False)}</th>" for r in results)
    cells = "".join(f"<td><pre>{html.escape(r.sample, quote=False)}</pre></td>" for r in results)
    return f'<table>\n<tr>{heads}</tr>\n<tr valign="top">{cells}</tr>\n</table>\n'


def write_report(
    out: Path,
    results: list[ModelResult],
    references: list[CountReference],
    data_name: str,
    prompt: str,
    seed: int,
    command: str,
) -> Path:
    """out/report.md and out/loss_curves.png."""
    curves = {r.label: read_metrics(r.run_dir) for r in results}
    bigram_counts = next(ref for ref in references if ref.label == "bigram counts")
    plot_comparison(curves, {"bigram counts, val": bigram_counts.val.nats}, out / CURVES)
    ev = results[0].evaluation
    best_steps = ", ".join(f"{r.label} {r.best_step:,}" for r in results)
    rates = ", ".join(f"{r.label} {r.learning_rate:g}" for r in results)
    report = f"""# Bigram baseline vs GPT

Generated by `{command}`. Data: `{data_name}`, split as in the lab (first 90% train, last 10%
validation; {ev.characters:,} validation characters). Losses are cross-entropies in nats per
character; bits/char and perplexity are those of the full pass.

{results_table(results, references)}
- **train loss** and **val loss (lab estimate)**: the lab's `estimate_loss`, the mean over
  {ev.windows:,} random windows of {ev.block_size} characters per split.
- **val loss (full pass)**: every validation character scored exactly once, windows of
  {ev.block_size} advancing by {ev.stride}, so each character sees at least
  {ev.block_size - ev.stride + 1} characters of context (`chargpt eval`).
- Each model is scored at its best-validation checkpoint (steps: {best_steps}); train time
  excludes evaluation. Peak learning rates: {rates}.
- The closed-form rows come from character counts on the training split with add-one
  smoothing: the unigram ignores context altogether, and the count-based bigram is the best any
  bigram model can do, so a well-trained bigram lands near it. A GPT lands below it as far as it
  has learned to use its {ev.block_size} characters of context.

![loss curves]({CURVES})

## Samples

Same prompt ({prompt!r}) and seed ({seed}), temperature 1.

{samples_table(results)}"""
    atomic_write_text(out / REPORT, report)
    return out / REPORT
