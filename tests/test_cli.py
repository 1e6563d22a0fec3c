import json
import math
import subprocess
import sys

import pytest

from chargpt.cli.main import main

TINY = ["--preset", "tiny", "--max-iters", "20", "--eval-interval", "10", "--sample-chars", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_a_run_directory(tiny_run):
    assert (tiny_run / "model.safetensors").is_file()
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["n_embd"] == 32 and config["train"]["max_iters"] == 20
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [0, 10, 20]
    assert records[-1]["val_loss"] < records[0]["val_loss"]  # it learned something
    assert config["best_val_loss"] == min(r["val_loss"] for r in records)
    assert set(records[0]) >= {"step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed"}


def test_same_seed_same_losses(tiny_run, tmp_path):
    assert main(["train", "--out", str(tmp_path / "again"), *TINY]) == 0

    def losses(run):
        return [
            (r["train_loss"], r["val_loss"])
            for r in map(json.loads, (run / "metrics.jsonl").open())
        ]

    assert losses(tmp_path / "again") == losses(tiny_run)


def test_sample_prints_prompt_and_continuation(tiny_run, capsys):
    args = ["sample", "--run", str(tiny_run), "--prompt", "ROMEO:", "--max-new-tokens", "30"]
    assert main([*args, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.rstrip("\n")) >= len("ROMEO:") + 20
    assert main([*args, "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_eval_reports_loss_bits_and_perplexity(tiny_run, capsys):
    assert main(["eval", "--run", str(tiny_run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 1.0 < report["val_loss"] < 4.5
    assert report["bits_per_char"] == pytest.approx(report["val_loss"] / math.log(2))


def test_console_script_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "chargpt"]
    done = subprocess.run(
        [*cmd, "train", "--out", str(out), *TINY], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "best val loss" in done.stderr
    sample = subprocess.run(
        [*cmd, "sample", "--run", str(out), "--max-new-tokens", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("\n")  # an empty prompt starts from a newline


def test_impossible_setting_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--out", str(out), *TINY, "--n-embd", "30", "--n-head", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "divisible by n_head" in err
    assert not out.exists()


def test_existing_run_is_never_overwritten(tiny_run, capsys):
    before = (tiny_run / "model.safetensors").read_bytes()
    assert main(["train", "--out", str(tiny_run), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tiny_run / "model.safetensors").read_bytes() == before


def test_a_taken_run_directory_is_refused_before_joining_other_processes(
    tiny_run, capsys, monkeypatch
):
    """Fail first, then start: under torchrun, joining the process group commits every other
    process to this one, so the checks come before it."""
    joined = []
    monkeypatch.setattr("chargpt.training.trainer.init_world", lambda device: joined.append(device))
    assert main(["train", "--out", str(tiny_run), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert joined == []


def test_a_closed_pipe_ends_sampling_quietly(tiny_run):
    # `chargpt sample | head -c 5`: the reader leaves early; no traceback, the shell's SIGPIPE code
    cmd = [
        sys.executable,
        "-m",
        "chargpt",
        "sample",
        "--run",
        str(tiny_run),
        "--seed",
        "1",
        "--max-new-tokens",
        "20000",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(5)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "Exception ignored" not in err


def test_a_short_run_with_the_default_preset_just_works(tmp_path):
    """`chargpt train --max-iters 50` stopped on the cpu preset's 100 warmup steps: a preset's
    warmup now fits the run (a tenth of it), here with small sizes to stay fast."""
    out, corpus = tmp_path / "short", tmp_path / "corpus.txt"
    corpus.write_text("to be, or not to be, that is the question.\n" * 30, encoding="utf-8")
    small = ["--data", str(corpus), "--n-layer", "1", "--n-embd", "16", "--block-size", "16"]
    small += ["--batch-size", "4"]
    flags = ["--device", "cpu", "--max-iters", "10", "--eval-iters", "1", "--sample-chars", "0"]
    assert main(["train", "--out", str(out), *small, *flags]) == 0  # auto: the cpu preset
    train = json.loads((out / "config.json").read_text())["train"]
    assert (train["optimizer"], train["max_iters"], train["warmup_iters"]) == ("muon", 10, 1)
