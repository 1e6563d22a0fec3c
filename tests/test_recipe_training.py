"""The recipe's training options: Muon's parameter groups, EMA evaluation, exact resume with
both, and training for a time budget (`--max-time`)."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_resume import MODEL, TRAIN, assert_same_state

from chargpt.config import TrainConfig, parse_duration
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.errors import ChargptError
from chargpt.model import GPTLanguageModel
from chargpt.runs.directory import CONFIG, LAST, load_run, read_safetensors
from chargpt.training.estimate import estimate_loss, estimate_seed
from chargpt.training.optim import Muon, Optimizers, configure_optimizer
from chargpt.training.resume import resume_run
from chargpt.training.state import STATE_KEY, load_trainer_state
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
    assert isinstance(optimizer, Optimizers)
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.parts["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.parts["adamw"].param_groups for p in g["params"]}
    assert muon == {
        f"blocks.{i}.{name}.weight"
        for i in range(2)
        for name in ("sa.qkv", "sa.proj", "ffwd.net.0", "ffwd.net.2")
    }
    assert adamw == set(names.values()) - muon
    assert {"token_embedding_table.weight", "lm_head.weight", "ln_f.weight"} <= adamw
    # AdamW's groups first: the learning rate a run logs is AdamW's
    assert [g["lr"] for g in optimizer.param_groups] == [TRAIN.learning_rate] * 2 + [TRAIN.muon_lr]


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9")
@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (24, 24)])
def test_muon_updates_a_matrix_as_torch_muon_does(shape):
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(shape))
    theirs = torch.nn.Parameter(ours.detach().clone())
    optimizers = Muon([ours], lr=0.02, weight_decay=0.1), torch.optim.Muon([theirs], lr=0.02)
    for _ in range(5):
        gradient = torch.randn(shape)
        ours.grad, theirs.grad = gradient.clone(), gradient.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(ours, theirs)
    ours_state, their_state = (o.state_dict() for o in optimizers)
    assert ours_state["param_groups"] == their_state["param_groups"]  # one saved state for both
    assert torch.equal(
        ours_state["state"][0]["momentum_buffer"], their_state["state"][0]["momentum_buffer"]
    )


def test_muon_trains_the_fused_and_the_reference_attention_alike(corpus):
    """The fused path's qkv matrix is orthogonalised one head's query, key or value at a time,
    as the reference path's separate Head matrices are: from the same weights, 20 Muon steps
    on the same batches leave both paths with the same weights."""
    dataset, tokenizer = corpus
    config = dataclasses.replace(MODEL, dropout=0.0)
    fused = GPTLanguageModel(config, tokenizer.vocab_size)
    reference_config = dataclasses.replace(config, attention="reference")
    reference = GPTLanguageModel(reference_config, tokenizer.vocab_size)
    reference.load_state_dict(fused.state_dict())
    muon = dataclasses.replace(TRAIN, optimizer="muon")
    paths = [(m, configure_optimizer(m, muon, ns_dtype=torch.float32)) for m in (fused, reference)]
    start = fused.state_dict()["blocks.0.sa.qkv.weight"].clone()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = dataset.get_batch("train", TRAIN.batch_size, config.block_size, generator, "cpu")
        for model, optimizer in paths:
            optimizer.zero_grad()
            model(x, y)[1].backward()
            optimizer.step()
    trained, expected = fused.state_dict(), reference.state_dict()
    assert (trained["blocks.0.sa.qkv.weight"] - start).abs().max() > 0.05  # Muon moved it
    for name, weight in expected.items():
        torch.testing.assert_close(trained[name], weight, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize(
    "changes",
    [
        dict(optimizer="muon"),
        dict(ema_decay=0.9),
        dict(optimizer="muon", ema_decay=0.9),
        dict(optimizer="muon", ema_decay=0.9, dtype="fp16"),  # with its loss scale
    ],
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
    lr_at_stop = trainer.lr
    assert TRAIN.min_lr < lr_at_stop < TRAIN.learning_rate
    resumed = resume_run(tmp_path / "run")
    assert resumed.clock.elapsed == resumed.train_time == trainer.train_time < 2
    assert resumed.lr == lr_at_stop
    result = resumed.run()
    assert result.steps > 10 and 2 <= resumed.train_time < 6
    assert lr_records(tmp_path / "run")[-1]["lr"] == pytest.approx(TRAIN.min_lr)


def write_as_version_1(run: Path) -> None:
    """Rewrite a run directory as format version 1 wrote it: one sequence of optimiser
    parameters (AdamW's, then Muon's) and one list of groups, the LambdaLR's state, one
    process's dropout stream as `rng.torch`, no lr_decay_iters in the saved options."""
    tensors, header = read_safetensors(run / LAST)
    scalars = json.loads(header[STATE_KEY])
    groups = scalars["optimizer_groups"]
    offset = sum(len(group["params"]) for group in groups["adamw"])
    old = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, part, index, name = key.split(".", 3)
            key = f"optimizer.{int(index) + (offset if part == 'muon' else 0)}.{name}"
        old["rng.torch" if key == "rng.rank0.torch" else key] = value
    muon_groups = [{**g, "params": [i + offset for i in g["params"]]} for g in groups["muon"]]
    scalars["optimizer_groups"] = groups["adamw"] + muon_groups
    scalars["scheduler"] = {"last_epoch": scalars["step"], "_step_count": scalars["step"] + 1}
    del scalars["train"]["lr_decay_iters"]
    del scalars["grad_scaler"]
    scalars["format_version"] = 1
    save_file(old, str(run / LAST), {"format": "pt", STATE_KEY: json.dumps(scalars)})
    config = json.loads((run / CONFIG).read_text())
    config["format_version"] = 1
    (run / CONFIG).write_text(json.dumps(config))


def test_a_run_saved_in_format_version_1_resumes_exactly(corpus, tmp_path, shakespeare):
    (tmp_path / "corpus.txt").write_text(shakespeare[:20_000], encoding="utf-8")
    changes = dict(optimizer="muon", ema_decay=0.9)
    straight, straight_losses = make_trainer(corpus, tmp_path / "straight", **changes)
    straight.run()
    first, first_losses = make_trainer(corpus, tmp_path / "split", **changes)
    first.data_name = str(tmp_path / "corpus.txt")
    first.stop_at = 20
    first.run()
    write_as_version_1(tmp_path / "split")
    second = resume_run(tmp_path / "split")
    assert second.cfg.lr_decay_iters == TRAIN.max_iters  # the decay of a run without the option
    second_losses, step = [], second.train_step

    def recording_step() -> torch.Tensor:
        loss = step()
        second_losses.append(loss.item())
        return loss

    second.train_step = recording_step
    second.run()
    assert first_losses + second_losses == straight_losses  # exact float equality
    assert_same_state(tmp_path / "straight", tmp_path / "split")  # written in today's format
    assert load_run(tmp_path / "split").meta["step"] > 0


@pytest.mark.parametrize(
    ("version", "message"),
    [(99, r"format version 99, newer than this chargpt .* reads: upgrade"), ("2", "invalid")],
)
def test_a_state_of_an_unknown_format_version_is_refused(corpus, tmp_path, version, message):
    """last.safetensors and config.json go through one version check."""
    trainer, _ = make_trainer(corpus, tmp_path, max_iters=1)
    trainer.run()
    tensors, header = read_safetensors(tmp_path / LAST)
    scalars = json.loads(header[STATE_KEY]) | {"format_version": version}
    save_file(tensors, str(tmp_path / LAST), {"format": "pt", STATE_KEY: json.dumps(scalars)})
    with pytest.raises(ChargptError, match=f"{LAST} has (an )?{message}"):
        load_trainer_state(tmp_path)


def test_fp16_trains_on_the_cpu_with_a_loss_scale(corpus, tmp_path):
    """fp16 autocast with torch.amp.GradScaler, for real on the CPU: the loss falls and the
    scale is saved with the run; a scale that overflows the gradients skips the step (the
    weights stay) and is halved."""
    trainer, losses = make_trainer(corpus, tmp_path, dtype="fp16", max_iters=30, eval_interval=30)
    assert trainer.dtype == torch.float16 and trainer.scaler.is_enabled()
    trainer.run()
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.5  # it learns
    _, scalars = load_trainer_state(tmp_path)
    assert scalars["grad_scaler"]["scale"] == trainer.scaler.get_scale() > 1
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # inf gradients
    trainer.train_step()
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.scaler.get_scale() == 2.0**99
    fp32, _ = make_trainer(corpus, tmp_path / "fp32", dtype="fp32")
    assert not fp32.scaler.is_enabled() and fp32.state_dict()["grad_scaler"] == {}
