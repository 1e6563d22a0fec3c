"""`chargpt train --init-from RUN`: fine-tuning a trained run on new text (with characters the run
never saw), and `--tensorboard` event files read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from chargpt.cli.main import main
from chargpt.data.corpus import load_text
from chargpt.data.tokenizer import CharTokenizer
from chargpt.runs.directory import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

# small enough for seconds on a busy CPU; the fine-tuning budget is a third of RUN's
SMALL = ["--preset", "tiny", "--block-size", "16", "--n-embd", "32", "--n-layer", "1"]
SMALL += ["--batch-size", "16", "--eval-iters", "20", "--sample-chars", "0", "--dtype", "fp32"]
BUDGET = ["--max-iters", "20", "--eval-interval", "20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """RUN: trained on tiny Shakespeare, whose vocabulary lacks Spanish letters."""
    out = tmp_path_factory.mktemp("finetune") / "shakespeare"
    assert (
        main(["train", "--out", str(out), *SMALL, "--max-iters", "60", "--eval-interval", "60"])
        == 0
    )
    return out


def val_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "config.json").read_text())["best_val_loss"]


def test_a_fine_tuned_run_beats_training_from_scratch_on_new_text(run, tmp_path):
    scratch, tuned = tmp_path / "scratch", tmp_path / "tuned"
    assert main(["train", "--out", str(scratch), "--data", "cartas", *SMALL, *BUDGET]) == 0
    flags = ["--init-from", str(run), "--data", "cartas"]
    assert main(["train", "--out", str(tuned), *flags, *SMALL, *BUDGET]) == 0
    assert val_loss(tuned) < val_loss(scratch) - 0.05  # measured: 2.54 against 2.71


def test_fine_tuning_joins_the_vocabulary_resumes_and_samples(run, tmp_path, capsys):
    data, tuned = tmp_path / "prepared", tmp_path / "tuned"
    assert main(["prepare", "--data", "cartas", "--out", str(data)]) == 0
    flags = ["--init-from", str(run), "--data", str(data), *SMALL, "--warmup-iters", "0"]
    assert (
        main(["train", "--out", str(tuned), *flags, "--max-iters", "4", "--eval-interval", "2"])
        == 0
    )
    config = json.loads((tuned / "config.json").read_text())
    run_chars = set(load_run(run).tokenizer.chars)
    joined = CharTokenizer.from_dict(config["tokenizer"])
    assert set(joined.chars) == run_chars | set(load_text("cartas"))
    assert config["train"]["init_from"] == str(run.resolve())
    assert config["model"]["n_embd"] == 32 and "fine-tuning" in capsys.readouterr().err
    # an ordinary run: it resumes (its data read through the joined vocabulary) and samples
    assert main(["train", "--resume", str(tuned), "--max-iters", "6"]) == 0
    assert json.loads((tuned / "config.json").read_text())["step"] == 6
    assert main(["sample", "--run", str(tuned), "--max-new-tokens", "20", "--seed", "1"]) == 0


def test_skip_drops_new_characters_and_wrong_sizes_are_refused(run, tmp_path, capsys):
    flags = ["--init-from", str(run), "--data", "cartas", *SMALL, "--max-iters", "2"]
    flags += ["--warmup-iters", "0"]
    assert main(["train", "--out", str(tmp_path / "a"), *flags, "--on-unknown", "error"]) == 2
    assert "11 character(s) the run never saw: '¡', '«'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "b"), *flags, "--n-embd", "64"]) == 2
    assert "--n-embd 64 (the run has 32)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    skip = ["--on-unknown", "skip", "--dropout", "0.1", "--attention", "reference"]
    timed = ["--max-time", "1s", "--eval-interval", "1000"]  # a time budget, as for any run
    assert main(["train", "--out", str(tmp_path / "c"), *flags, *skip, *timed]) == 0
    tuned = load_run(tmp_path / "c")
    assert tuned.tokenizer == load_run(run).tokenizer
    assert (tuned.model_config.dropout, tuned.model_config.attention) == (0.1, "reference")
    last = json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[-1])
    assert tuned.train_config.max_time == "1s" and last["step"] > 0 and last["elapsed"] >= 1
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "c"), "--json"]) == 0  # skips them too
    text = load_text("cartas")
    kept = sum(ch in tuned.tokenizer.stoi for ch in text[int(0.9 * len(text)) :])
    assert json.loads(capsys.readouterr().out)["characters"] == kept


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_event_files_read_back_and_a_resumed_run_appends(tmp_path):
    out = tmp_path / "run"
    tiny = ["--preset", "tiny", "--block-size", "8", "--eval-iters", "2", "--sample-chars", "12"]
    tiny += ["--log-interval", "1", "--eval-interval", "2", "--warmup-iters", "0", "--tensorboard"]
    assert main(["train", "--out", str(out), *tiny, "--max-iters", "4"]) == 0
    # a session that crashed after logging step 5, past its last saved state (step 4)
    with SummaryWriter(str(out)) as crashed:
        crashed.add_scalar("loss/train_steps", 99.0, 5)
    assert main(["train", "--resume", str(out), "--max-iters", "6"]) == 0

    train_steps = scalars(out, "loss/train_steps")
    assert [step for step, _ in train_steps] == [1, 2, 3, 4, 5, 6]  # one curve, step 5 redone
    assert 99.0 not in [value for _, value in train_steps]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    for split in ("train", "val"):
        logged = scalars(out, f"loss/{split}")
        assert [step for step, _ in logged] == [r["step"] for r in metrics] == [0, 2, 4, 6]
        expected = [r[f"{split}_loss"] for r in metrics]
        assert [value for _, value in logged] == pytest.approx(expected, rel=1e-6)
    lrs = scalars(out, "learning_rate/adamw")
    assert [step for step, _ in lrs] == [1, 2, 3, 4, 5, 6] and lrs[0][1] > 0
    assert all(value > 0 for _, value in scalars(out, "tokens_per_s"))
    events = EventAccumulator(str(out))
    events.Reload()
    samples = events.Tensors("sample/text_summary")
    assert [s.step for s in samples] == [0, 2, 4, 6]
    assert samples[0].tensor_proto.string_val[0].strip()  # the sample's text
    assert (out / "loss.png").is_file()  # metrics.jsonl and loss.png stay


def test_tensorboard_without_its_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    flags = ["--preset", "tiny", "--max-iters", "2", "--warmup-iters", "0", "--tensorboard"]
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    assert "pip install 'chargpt[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
