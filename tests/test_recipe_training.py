"""The recipe's training options: Muon's parameter groups, EMA evaluation, exact resume with
both, and training for a time budget (`--max-time`)."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest
import torch
from test_resume import MODEL, TRAIN, assert_same_state

from chargpt.config import TrainConfig, parse_duration
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.model import GPTLanguageModel
from chargpt.runs.directory import load_run
from chargpt.training.estimate import estimate_loss, estimate_seed
from chargpt.training.optim import MuonWithAdamW, configure_optimizer
from chargpt.training.resume import resume_run
from chargpt.training.state import load_trainer_state
from chargpt.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(shakespeare: str) -> tuple[CharDataset, CharTokenizer]:
    text = shakespeare[:20_000]
    tokenizer = CharTokenizer.from_text(text)
    return CharDataset.from_text(text, tokenizer), tokenizer


def make_trainer(corpus, out: Path, model=MODEL, **train_changes) -> tuple[Trainer, list[float]]:
    """A trainer whose per-step training losses are collected in the returned list."""
    dataset, tokenizer = corpus
    trainer = Trainer(model, dataclasses.replace(TRAIN, **train_changes), dataset, tokenizer, out)
    losses: list[float] = []
    step = trainer.train_step

    def recording_step() -> torch.Tensor:
        loss = step()
        losses.append(loss.item())
        if trainer.step == trainer.stop_at:  # what a SIGINT during that step does
            trainer.stop_signal = signal.SIGINT
        return loss

    trainer.stop_at = -1
    trainer.train_step = recording_step
    return trainer, losses


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPTLanguageModel(dataclasses.replace(MODEL, n_layer=2), vocab_size=11)
    optimizer = configure_optimizer(model, dataclasses.replace(TRAIN, optimizer="muon"))
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon == {
        f"blocks.{i}.{name}.weight"
        for i in range(2)
        for name in ("sa.qkv", "sa.proj", "ffwd.net.0", "ffwd.net.2")
    }
    assert adamw == set(names.values()) - muon
    assert {"token_embedding_table.weight", "lm_head.weight", "ln_f.weight"} <= adamw
    # AdamW's groups first: the learning rate a run logs is AdamW's
    assert [g["lr"] for g in optimizer.param_groups] == [TRAIN.learning_rate] * 2 + [TRAIN.muon_lr]


def test_muon_on_an_older_torch_is_a_one_line_error(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    model = GPTLanguageModel(MODEL, vocab_size=11)
    with pytest.raises(ChargptError, match=r"needs torch >= 2\.9.*--optimizer adamw"):
        configure_optimizer(model, dataclasses.replace(TRAIN, optimizer="muon"))


@pytest.mark.parametrize(
    "changes", [dict(optimizer="muon"), dict(ema_decay=0.9), dict(optimizer="muon", ema_decay=0.9)]
)
def test_stop_and_resume_is_exact_with_muon_and_ema(corpus, tmp_path, changes):
    straight, straight_losses = make_trainer(corpus, tmp_path / "straight", **changes)
    straight.run()
    first, first_losses = make_trainer(corpus, tmp_path / "split", **changes)
    first.stop_at = 20
    assert first.run().stopped_by == signal.SIGINT
    second, second_losses = make_trainer(corpus, tmp_path / "split", **changes)
    second.restore(*load_trainer_state(tmp_path / "split"))
    second.run()
    assert first_losses + second_losses == straight_losses  # exact float equality
    assert straight_losses[-1] < straight_losses[0]  # it learns
    assert_same_state(tmp_path / "straight", tmp_path / "split")


def test_ema_weights_are_evaluated_and_saved_as_the_best(corpus, tmp_path):
    trainer, _ = make_trainer(corpus, tmp_path, ema_decay=0.9, max_iters=15)
    trainer.run()
    ema = trainer.ema.module
    best = load_run(tmp_path).model.state_dict()
    assert all(torch.equal(best[k], v) for k, v in ema.state_dict().items())
    assert not torch.equal(best["lm_head.weight"], trainer.model.lm_head.weight)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    windows = (TRAIN.batch_size, MODEL.block_size, TRAIN.eval_iters)
    seed = estimate_seed(TRAIN.seed)
    losses = estimate_loss(ema, corpus[0], *windows, trainer.device, trainer.dtype, seed)
    assert record["val_loss"] == pytest.approx(losses["val"])


@pytest.mark.parametrize(
    ("text", "seconds"), [("5m", 300), ("90s", 90), ("1h", 3600), ("1.5h", 5400), ("45", 45)]
)
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "-1m", "0s", "five minutes", "nanh", "infs"])
def test_a_bad_duration_is_a_one_line_error(text):
    with pytest.raises(ChargptError, match=r"max_time must be a positive duration.*5m") as err:
        TrainConfig(max_time=text or "x").validate()
    assert "\n" not in str(err.value)


def budget_changes(seconds: str) -> dict:
    """A cosine schedule paced by `seconds` of training, steps left uncapped."""
    return dict(max_time=seconds, max_iters=1, eval_interval=200, warmup_iters=2, sample_chars=0)


def lr_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_time_budget_run_stops_by_itself_at_min_lr(corpus, tmp_path):
    trainer, _ = make_trainer(corpus, tmp_path, **budget_changes("1.5s"))
    result = trainer.run()
    assert result.stopped_by is None
    assert result.steps > 1  # max_iters does not cap a time budget
    assert 1.5 <= trainer.train_time < 5
    last = lr_records(tmp_path)[-1]
    assert last["step"] == result.steps  # the last evaluation comes when the time is up
    assert last["lr"] == pytest.approx(TRAIN.min_lr)
    with pytest.raises(ChargptError, match=r"already trained for its --max-time 1\.5s"):
        resume_run(tmp_path, data=None)


def test_resuming_a_time_budget_run_continues_its_schedule(corpus, tmp_path, shakespeare):
    (tmp_path / "corpus.txt").write_text(shakespeare[:20_000], encoding="utf-8")
    trainer, _ = make_trainer(corpus, tmp_path / "run", **budget_changes("2s"))
    trainer.data_name = str(tmp_path / "corpus.txt")
    trainer.stop_at = 10
    trainer.run()
    lr_at_stop = trainer.scheduler.get_last_lr()[0]
    assert TRAIN.min_lr < lr_at_stop < TRAIN.learning_rate
    resumed = resume_run(tmp_path / "run")
    assert resumed.clock.elapsed == resumed.train_time == trainer.train_time < 2
    assert resumed.scheduler.get_last_lr()[0] == lr_at_stop
    result = resumed.run()
    assert result.steps > 10 and 2 <= resumed.train_time < 6
    assert lr_records(tmp_path / "run")[-1]["lr"] == pytest.approx(TRAIN.min_lr)
