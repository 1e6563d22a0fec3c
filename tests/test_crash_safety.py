"""Crash safety: SIGKILL while saving, SIGINT/SIGTERM while training, NaN losses."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from chargpt.cli.main import main
from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.runs.directory import CONFIG, LAST, load_run
from chargpt.training.state import load_trainer_state
from chargpt.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

KILL_TRIALS = 40
TINY = ["--preset", "tiny", "--block-size", "8", "--batch-size", "4", "--n-embd", "16"]
TINY += ["--n-layer", "1", "--eval-iters", "1"]


def tiny_trainer(out: Path) -> Trainer:
    text = "to be or not to be, that is the question. " * 50
    tokenizer = CharTokenizer.from_text(text)
    model = ModelConfig(block_size=16, n_embd=32, n_head=2, n_layer=2, dropout=0.0)
    train = TrainConfig(batch_size=4, max_iters=1, eval_iters=1, sample_chars=0, device="cpu")
    return Trainer(model, train, CharDataset.from_text(text, tokenizer), tokenizer, out)


def save_filled(trainer: Trainer, k: int) -> None:
    """Save k: every weight is k, so that a loader can tell whether the weights and the step and
    loss stored with them belong together."""
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(k)
    trainer.step, trainer.best_val_loss, trainer.best_step = k, float(k), k
    trainer.save()
    trainer.save_last()


def save_forever(trainer: Trainer, saved_once: int) -> None:
    """Save checkpoints as fast as possible, writing a byte to the pipe `saved_once` when the
    first is on disk."""
    save_filled(trainer, trainer.step + 1)
    os.write(saved_once, b".")
    os.close(saved_once)
    while True:
        save_filled(trainer, trainer.step + 1)


def check_loadable(run_dir: Path) -> dict[str, int]:
    """Both checkpoints load, and each one's weights match the step stored with them."""
    run = load_run(run_dir)
    step = run.meta["step"]
    assert all(torch.all(p == step) for p in run.model.parameters())
    assert run.meta["best_val_loss"] == step
    tensors, state = load_trainer_state(run_dir)
    assert all(torch.all(t == state["step"]) for k, t in tensors.items() if k.startswith("model."))
    resumed = tiny_trainer(run_dir)
    resumed.restore(tensors, state)  # the whole resume path accepts it
    config_step = json.loads((run_dir / CONFIG).read_text())["step"]
    return {"best": step, "last": state["step"], "config": config_step}


def test_sigkill_while_saving_always_leaves_a_loadable_run(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path)
    trainer.run()  # a real first checkpoint, with AdamW moments
    rng = random.Random(0)
    torn_writes = stale_configs = 0
    steps = []
    for _ in range(KILL_TRIALS):
        saved_once, written = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
            pid = os.fork()
        if pid == 0:  # the child saves until it is killed
            try:
                os.close(saved_once)
                save_forever(trainer, written)
            finally:
                os._exit(1)
        os.close(written)
        # from its first save on, the child saves back to back: a kill a few saves later lands
        # anywhere in one (the trained checkpoint before it does not hold weights equal to steps)
        os.read(saved_once, 1)
        os.close(saved_once)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        torn_writes += any(tmp_path.glob(".*.tmp"))  # killed in the middle of a write
        found = check_loadable(tmp_path)
        stale_configs += found["config"] != found["best"]  # killed between two renames
        steps.append(found["last"])
        trainer.step = found["last"]
        for tmp in tmp_path.glob(".*.tmp"):
            tmp.unlink()
    print(
        f"{KILL_TRIALS} SIGKILLs while saving, 0 unloadable run directories; "
        f"{torn_writes} left a half-written temporary file, {stale_configs} fell between "
        f"the weights' and config.json's renames; last steps {steps[0]}..{steps[-1]}"
    )
    assert len(set(steps)) > KILL_TRIALS // 2  # the kills landed at many different moments


def start_training(out: Path, corpus: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "chargpt", "train", "--out", str(out), "--data", str(corpus)]
    command += [*TINY, "--max-iters", "100000", "--eval-interval", "3", "--sample-chars", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see the one_thread fixture
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def wait_for_step(out: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {step}: {process.communicate()}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_exits_with_a_resume_hint(signum: int, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("all the world's a stage, and all the men and women merely players. " * 40)
    out = tmp_path / "run"
    process = start_training(out, corpus)
    wait_for_step(out, 3, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert f"{signal.Signals(signum).name}: stopped at step" in last_line
    assert f"continue with: chargpt train --resume {out}" in last_line
    _, state = load_trainer_state(out)
    assert f"stopped at step {state['step']} and saved" in last_line  # the step it saved
    assert state["step"] >= 3
    assert main(["train", "--resume", str(out), "--max-iters", str(state["step"] + 2)]) == 0
    assert load_trainer_state(out)[1]["step"] == state["step"] + 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("now is the winter of our discontent made glorious summer. " * 40)
    out = tmp_path / "run"
    absurd = ["--learning-rate", "1e30", "--min-lr", "1e30", "--grad-clip", "0"]
    argv = ["train", "--out", str(out), "--data", str(corpus), *TINY, *absurd]
    assert main([*argv, "--max-iters", "50", "--eval-interval", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1]  # after the line that describes the run
    assert "training stopped at step" in err and "loss is nan" in err
    assert "the last good state (step 0) is kept" in err
    assert "lower --learning-rate (now 1e+30) or set --grad-clip 1.0" in err
    tensors, state = load_trainer_state(out)  # the state of step 0, untouched by the NaNs
    assert state["step"] == 0
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))
    assert all(torch.isfinite(p).all() for p in load_run(out).model.parameters())
    assert not list(out.glob(".*.tmp"))
    assert (out / LAST).is_file()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a horse, a horse, my kingdom for a horse. " * 40)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--data", str(corpus), *TINY, "--eval-interval", "2"]
    assert main([*argv, "--max-iters", "2", "--warmup-iters", "2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".safetensors"}

    def fill_the_disk(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("chargpt.runs.directory.save_file", fill_the_disk)
        patch.setattr("chargpt.training.state.save_file", fill_the_disk)
        assert main(["train", "--resume", str(out), "--max-iters", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("chargpt train: error: No space left on device (")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".safetensors"}
    assert after == before  # the checkpoints of step 2, whole
    assert not list(out.glob(".*.tmp"))
    assert load_trainer_state(out)[1]["step"] == 2
