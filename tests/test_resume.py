"""Exact resume: a run stopped and resumed trains bit for bit like one that never stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from chargpt.cli.main import main
from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.runs.directory import LAST, load_run, read_safetensors
from chargpt.training.distributed import World
from chargpt.training.resume import resume_configs
from chargpt.training.state import load_trainer_state
from chargpt.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# dropout > 0 so that the global torch generator matters; eval_interval 15 so that step 20 is
# no evaluation step of the straight run; samples while training draw random numbers too
MODEL = ModelConfig(block_size=8, n_embd=16, n_head=2, n_layer=1, dropout=0.1)
TRAIN = TrainConfig(
    batch_size=4,
    max_iters=40,
    eval_interval=15,
    eval_iters=2,
    learning_rate=3e-3,
    min_lr=3e-4,
    warmup_iters=5,
    lr_schedule="cosine",
    grad_clip=1.0,
    sample_chars=4,
    device="cpu",
    dtype="fp32",
)
CLI_TINY = ["--preset", "tiny", "--block-size", "8", "--batch-size", "4", "--n-embd", "16"]
CLI_TINY += ["--n-layer", "1", "--eval-iters", "1", "--sample-chars", "4"]


@pytest.fixture(scope="module")
def corpus(shakespeare: str) -> tuple[CharDataset, CharTokenizer]:
    text = shakespeare[:20_000]
    tokenizer = CharTokenizer.from_text(text)
    return CharDataset.from_text(text, tokenizer), tokenizer


def make_trainer(corpus, out: Path, **train_changes) -> tuple[Trainer, list[float]]:
    """A trainer whose per-step training losses are collected in the returned list."""
    dataset, tokenizer = corpus
    cfg = dataclasses.replace(TRAIN, **train_changes)
    trainer = Trainer(MODEL, cfg, dataset, tokenizer, out)
    losses: list[float] = []
    step = trainer.train_step

    def recording_step() -> torch.Tensor:
        loss = step()
        losses.append(loss.item())
        return loss

    trainer.train_step = recording_step
    return trainer, losses


def assert_same_state(a: Path, b: Path) -> None:
    """Weights, AdamW moments and random states bit for bit; the scalars equal too."""
    tensors_a, state_a = load_trainer_state(a)
    tensors_b, state_b = load_trainer_state(b)
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    for state in (state_a, state_b):
        state.pop("train_time")
    assert state_a == state_b


def test_stop_at_20_and_resume_matches_40_straight(corpus, tmp_path: Path) -> None:
    straight, straight_losses = make_trainer(corpus, tmp_path / "straight")
    straight.run()

    first, first_losses = make_trainer(corpus, tmp_path / "split")
    step = first.train_step

    def stop_after_20() -> float:  # what a SIGINT during step 20 does
        loss = step()
        if first.step == 20:
            first.stop_signal = signal.SIGINT
        return loss

    first.train_step = stop_after_20
    result = first.run()
    assert (result.steps, result.stopped_by) == (20, signal.SIGINT)

    second, second_losses = make_trainer(corpus, tmp_path / "split")
    second.restore(*load_trainer_state(tmp_path / "split"))
    assert second.run().stopped_by is None

    assert len(straight_losses) == 40
    assert first_losses + second_losses == straight_losses  # exact float equality
    assert_same_state(tmp_path / "straight", tmp_path / "split")
    best_straight = load_run(tmp_path / "straight").model.state_dict()
    best_split = load_run(tmp_path / "split").model.state_dict()
    assert all(torch.equal(best_straight[k], best_split[k]) for k in best_straight)


def test_evaluation_does_not_move_the_training_random_streams(corpus, tmp_path: Path) -> None:
    """Same losses whether or not losses are estimated and samples drawn in between."""
    often, often_losses = make_trainer(corpus, tmp_path / "often", max_iters=6, eval_interval=1)
    often.run()
    rarely, rarely_losses = make_trainer(corpus, tmp_path / "rarely", max_iters=6)
    rarely.run()
    assert often_losses == rarely_losses


def run_cli(*args: str) -> int:
    return main(["train", *args])


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("elapsed", "tokens_per_s")}
        for line in lines
    ]


def test_cli_resume_with_a_larger_max_iters(tmp_path: Path) -> None:
    """6 steps then `--resume --max-iters 12` equals 12 straight, when the first run's schedule
    was laid out for 12 steps."""
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    common = [*CLI_TINY, "--lr-decay-iters", "12", "--eval-interval", "3", "--data", str(data)]
    assert run_cli("--out", str(tmp_path / "straight"), *common, "--max-iters", "12") == 0
    assert run_cli("--out", str(tmp_path / "split"), *common, "--max-iters", "6") == 0
    assert run_cli("--resume", str(tmp_path / "split"), "--max-iters", "12") == 0
    assert_same_state(tmp_path / "straight", tmp_path / "split")
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "split")
    assert [m["step"] for m in metrics(tmp_path / "split")] == [0, 3, 6, 9, 12]
    # the best weights' own header gives the step they were saved at
    assert load_run(tmp_path / "split").meta["step"] == 12


@pytest.mark.parametrize(
    "changes, refused",
    [
        ({"n_embd": 64}, "--n-embd"),
        ({"n_layer": 3}, "--n-layer"),
        ({"model": "bigram"}, "--model"),
        ({"learning_rate": 0.1, "seed": 3}, "--learning-rate, --seed"),
        ({"batch_size": 2}, "--batch-size"),
    ],
)
def test_resume_refuses_changes_to_the_run_identity(changes: dict, refused: str) -> None:
    with pytest.raises(ChargptError, match=f"cannot change {refused} when resuming"):
        resume_configs(MODEL, TRAIN, changes)


def test_resume_allows_training_longer_and_same_values() -> None:
    model, train = resume_configs(
        MODEL, TRAIN, {"max_iters": 100, "eval_interval": 7, "n_embd": 16, "seed": TRAIN.seed}
    )
    assert model == MODEL
    assert (train.max_iters, train.eval_interval) == (100, 7)
    assert dataclasses.replace(train, max_iters=40, eval_interval=15) == TRAIN


def test_resume_refuses_a_different_corpus_and_a_finished_run(tmp_path: Path, capsys) -> None:
    data = tmp_path / "corpus.txt"
    data.write_text("abcdefghij" * 100, encoding="utf-8")
    run = tmp_path / "run"
    flags = [*CLI_TINY, "--max-iters", "2", "--warmup-iters", "2", "--data", str(data)]
    assert run_cli("--out", str(run), *flags) == 0
    assert run_cli("--resume", str(run)) == 2
    assert "already ran 2 of its 2 steps: pass a larger --max-iters" in capsys.readouterr().err
    data.write_text("jihgfedcba" * 100, encoding="utf-8")  # same characters, other text
    assert run_cli("--resume", str(run), "--max-iters", "4") == 2
    assert "is not the text" in capsys.readouterr().err
    assert run_cli("--resume", str(run), "--preset", "tiny", "--max-iters", "4") == 2
    assert "--preset cannot be used with --resume" in capsys.readouterr().err


def test_resume_refuses_a_state_from_another_model(corpus, tmp_path: Path, capsys) -> None:
    """config.json and last.safetensors of two different runs: the files disagree."""
    small, _ = make_trainer(corpus, tmp_path / "a", max_iters=1)
    small.run()
    dataset, tokenizer = corpus
    wide = dataclasses.replace(MODEL, n_embd=32)
    one_step = dataclasses.replace(TRAIN, max_iters=1)
    other = Trainer(wide, one_step, dataset, tokenizer, tmp_path / "b")
    other.run()
    (tmp_path / "b" / LAST).replace(tmp_path / "a" / LAST)
    tensors, state = load_trainer_state(tmp_path / "a")
    assert read_safetensors(tmp_path / "a" / LAST)[0].keys() == tensors.keys()
    fresh, _ = make_trainer(corpus, tmp_path / "a")
    with pytest.raises(ChargptError, match=r"does not match config\.json"):
        fresh.restore(tensors, state)


def test_a_finished_cosine_run_trains_longer_at_min_lr(tmp_path: Path, capsys) -> None:
    """Resuming with a larger --max-iters continues the schedule the run started with: past
    its lr_decay_iters (its first max_iters) the rate stays at min_lr, it never rises again."""
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    run = tmp_path / "run"
    flags = [*CLI_TINY, "--eval-interval", "2", "--data", str(data)]  # tiny: cosine 1e-2 -> 1e-3
    assert run_cli("--out", str(run), *flags, "--max-iters", "12") == 0
    assert run_cli("--resume", str(run)) == 2
    err = capsys.readouterr().err
    assert "already ran 12 of its 12 steps: pass a larger --max-iters" in err
    assert "past step 12 the learning rate stays at min_lr 0.001" in err
    assert run_cli("--resume", str(run), "--max-iters", "24") == 0
    rates = {m["step"]: m["lr"] for m in metrics(run)}
    assert list(rates) == list(range(0, 25, 2))
    after_warmup = [rates[step] for step in range(6, 25, 2)]
    assert after_warmup == sorted(after_warmup, reverse=True)  # never rises
    assert all(rates[step] == pytest.approx(1e-3) for step in range(12, 25, 2))
    assert json.loads((run / "config.json").read_text())["train"]["lr_decay_iters"] == 12


def test_resume_leaves_python_and_numpy_random_alone(corpus, tmp_path: Path) -> None:
    """Training never draws from them, so a resume must not reset a host program's streams."""
    trainer, _ = make_trainer(corpus, tmp_path, max_iters=2)
    trainer.run()
    fresh, _ = make_trainer(corpus, tmp_path, max_iters=4)
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    fresh.restore(*load_trainer_state(tmp_path))
    assert (random.random(), np.random.rand()) == expected


def test_only_the_main_process_tidies_the_run_directory(corpus, tmp_path: Path, monkeypatch):
    """On resume, rank 0 alone drops stale metrics and temporaries, and the others wait for it:
    a second process must never delete a file another one is writing."""
    trainer, _ = make_trainer(corpus, tmp_path, max_iters=2, eval_interval=1)
    trainer.run()
    with (tmp_path / "metrics.jsonl").open("a") as f:  # logged after the saved state
        f.write(json.dumps({"step": 3, "train_loss": 1.0, "val_loss": 1.0}) + "\n")
    temporary = tmp_path / ".model.safetensors.in-flight.tmp"
    temporary.write_bytes(b"being written")
    waits = []
    monkeypatch.setattr("chargpt.training.trainer.barrier", waits.append)

    other, _ = make_trainer(corpus, tmp_path, max_iters=4)
    other.world = World(rank=1, local_rank=1, size=2)
    other.restore(*load_trainer_state(tmp_path))
    assert temporary.exists() and 3 in [m["step"] for m in metrics(tmp_path)]
    assert waits == [other.world]

    main_process, _ = make_trainer(corpus, tmp_path, max_iters=4)
    main_process.restore(*load_trainer_state(tmp_path))
    assert not temporary.exists() and [m["step"] for m in metrics(tmp_path)] == [0, 1, 2]


def test_a_relative_data_path_resumes_and_evaluates_from_anywhere(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text = "the quick brown fox jumps over the lazy dog. " * 200
    (tmp_path / "a" / "corpus.txt").write_text(text, encoding="utf-8")
    flags = [*CLI_TINY, "--max-iters", "2", "--warmup-iters", "1", "--eval-interval", "2"]
    with contextlib.chdir(tmp_path / "a"):
        assert run_cli("--out", "run", "--data", "corpus.txt", *flags) == 0
    config = json.loads((tmp_path / "a" / "run" / "config.json").read_text())
    assert config["data"] == str((tmp_path / "a" / "corpus.txt").resolve())
    with contextlib.chdir(tmp_path / "b"):
        assert main(["eval", "--run", "../a/run", "--eval-iters", "1"]) == 0
        assert run_cli("--resume", "../a/run", "--max-iters", "4") == 0
    assert load_trainer_state(tmp_path / "a" / "run")[1]["step"] == 4
