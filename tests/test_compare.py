"""`chargpt compare` end to end, its time budget, and the loss plots."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from chargpt.cli.main import main
from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.eval.counts import count_references
from chargpt.eval.evaluate import full_pass_loss, validation_stream
from chargpt.training.trainer import Trainer
from chargpt.viz.plot import plot_after_training, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def markov_text(n: int, seed: int = 0) -> str:
    """Text from a 7-character Markov chain: each character mostly picks one of two successors,
    so the previous character says a lot about the next (a bigram beats a unigram)."""
    chars = "abcde \n"
    rng = np.random.default_rng(seed)
    transitions = np.full((7, 7), 0.05 / 7)
    for i in range(7):
        transitions[i, (i + 1) % 7] += 0.65
        transitions[i, (i + 3) % 7] += 0.30
    out, state = [], 0
    for _ in range(n):
        state = rng.choice(7, p=transitions[state])
        out.append(chars[state])
    return "".join(out)


CORPUS = markov_text(3000)
TINY = (
    "--preset tiny --block-size 8 --n-embd 16 --n-head 2 --n-layer 1 --batch-size 8 "
    "--eval-interval 3 --eval-iters 2 --sample-chars 0 --device cpu"
)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = root / "cmp"
    args = ["compare", "--out", str(out), "--data", str(corpus), "--budget-iters", "6"]
    assert main([*args, "--sample-length", "30", "--prompt", "ab", *TINY.split()]) == 0
    return root, out


def table_row(report: str, label: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_compare_writes_report_with_table_plot_and_samples(comparison):
    _, out = comparison
    report = (out / "report.md").read_text(encoding="utf-8")
    assert (out / "loss_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "![loss curves](loss_curves.png)" in report
    for label in ("**bigram**", "**gpt**"):
        row = table_row(report, label)
        assert row[2] == "6" and row[3] == f"{6 * 8 * 8:,}"  # steps; tokens = steps * B * T
    for label in ("unigram counts", "bigram counts"):
        assert table_row(report, label)
    # the samples: both continue the same prompt, side by side in one HTML table
    samples = re.findall(r"<pre>(.*?)</pre>", report, flags=re.S)
    assert len(samples) == 2 and all(s.startswith("ab") and len(s) == 32 for s in samples)
    # each model keeps its own run directory, with the plot that training writes
    for name in ("bigram", "gpt"):
        assert (out / name / "loss.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_of_existing_runs_scores_them_identically(comparison, capsys):
    root, out = comparison
    again = root / "again"
    runs = ["--runs", str(out / "gpt"), str(out / "bigram")]
    assert main(["compare", "--out", str(again), *runs, "--sample-length", "5"]) == 0
    first = (out / "report.md").read_text(encoding="utf-8")
    second = (again / "report.md").read_text(encoding="utf-8")
    for label in ("**bigram**", "**gpt**", "bigram counts"):
        assert table_row(first, label)[7] == table_row(second, label)[7]  # full-pass val loss
    assert second.index("**gpt**") < second.index("**bigram**")  # the order given


def test_compare_never_overwrites_a_report(comparison, capsys):
    _, out = comparison
    before = (out / "report.md").read_bytes()
    runs = ["--runs", str(out / "gpt"), str(out / "bigram")]
    assert main(["compare", "--out", str(out), *runs]) == 2
    assert "already holds a comparison" in capsys.readouterr().err
    assert (out / "report.md").read_bytes() == before


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--model gpt", "drop --model"),
        ("--budget-seconds 0", "--budget-seconds"),
        ("--prompt Z", "not in the vocabulary"),
        ("--bigram-learning-rate -1", "--bigram-learning-rate"),
    ],
)
def test_compare_rejects_bad_options_before_training(tmp_path, capsys, flags, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    args = ["compare", "--out", str(tmp_path / "cmp"), "--data", str(corpus), *flags.split()]
    assert main([*args, *TINY.split()]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "gpt").exists()


def test_a_step_budget_works_with_the_default_preset(tmp_path):
    """`chargpt compare --budget-iters 60` stopped on the cpu preset's 100 warmup steps."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    args = ["compare", "--out", str(tmp_path / "cmp"), "--data", str(corpus), "--budget-iters", "6"]
    small = "--block-size 8 --n-embd 16 --n-layer 1 --batch-size 8 --eval-iters 2 --device cpu"
    assert main([*args, "--sample-length", "5", "--sample-chars", "0", *small.split()]) == 0
    train = json.loads((tmp_path / "cmp" / "gpt" / "config.json").read_text())["train"]
    assert (train["optimizer"], train["max_iters"], train["warmup_iters"]) == ("muon", 6, 0)


def tiny_dataset() -> tuple[CharDataset, CharTokenizer]:
    tokenizer = CharTokenizer.from_text(CORPUS)
    return CharDataset.from_text(CORPUS, tokenizer), tokenizer


def test_a_time_budget_trains_both_models_for_that_training_time(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), "--data", str(corpus), "--budget-seconds", "0.5"]
    assert main([*args, *TINY.split()]) == 0
    for name in ("bigram", "gpt"):
        saved = json.loads((out / name / "config.json").read_text())
        assert saved["train"]["max_time"] == "0.5s"
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
        assert records[-1]["elapsed"] >= 0.5
    assert (out / "report.md").exists()


def test_trained_bigram_lands_near_the_count_based_bigram(tmp_path):
    """A bigram trained long enough approaches the closed-form count model on validation."""
    dataset, tokenizer = tiny_dataset()
    model = ModelConfig(model="bigram", block_size=16)
    train = TrainConfig(
        batch_size=32,
        max_iters=250,
        eval_interval=250,
        eval_iters=1,
        learning_rate=5e-2,
        weight_decay=0.0,
        sample_chars=0,
        device="cpu",
    )
    trainer = Trainer(model, train, dataset, tokenizer, tmp_path)
    trainer.run()
    tokens, start = validation_stream(dataset, 16)
    loss, _ = full_pass_loss(trainer.model, tokens, 16, start)
    unigram, bigram = count_references(dataset, tokenizer.vocab_size)
    assert loss == pytest.approx(bigram.val.nats, abs=0.02)
    assert bigram.val.nats < unigram.val.nats


def test_plot_command_draws_steps_and_tokens(comparison, capsys):
    _, out = comparison
    png = out / "custom.png"
    assert main(["plot", "--run", str(out / "gpt"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert main(["plot", "--run", str(out)]) == 2  # not a run: no metrics.jsonl
    assert "metrics.jsonl" in capsys.readouterr().err


def test_missing_matplotlib_is_one_line_error_and_training_skips_it(comparison, monkeypatch):
    _, out = comparison
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(ChargptError, match=r"pip install 'chargpt\[plot\]'"):
        plot_run(out / "gpt", out / "never.png")
    assert plot_after_training(out / "gpt") is None
    assert not (out / "never.png").exists()
