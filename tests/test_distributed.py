"""Multi-process training through torchrun + DistributedDataParallel (gloo, on CPU).

Each torchrun start-up costs seconds, so the runs are shared: tests that only read a run's
results take it from a module fixture (a file's tests run on one xdist worker: --dist loadfile),
and single-process runs happen in this process."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from chargpt.cli.main import main
from chargpt.errors import ChargptError
from chargpt.runs.directory import LAST, load_run
from chargpt.training.distributed import World, backend, init_world, micro_batch_streams

# Runs started apart measure their precision apart (TrainingPrecision): on a CPU where bf16 and
# fp32 time alike, they could choose differently, so runs compared here compute in fp32.
TINY = ["--preset", "tiny", "--max-iters", "8", "--eval-interval", "4", "--sample-chars", "0"]
TINY += ["--dtype", "fp32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TWO_PROCESSES = (*TORCHRUN, "--standalone", "--nproc_per_node", "2")
# The same sums in another order: gradients are averaged over processes instead of micro-batches.
TOLERANCE = 1e-5
# the schedule of 8 steps from the start, so that 4 + 4 steps of a resumed run follow it as 8
# straight steps do
SCHEDULE = ["--warmup-iters", "4", "--lr-decay-iters", "8"]


def chargpt(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [*launcher, "-m", "chargpt"] if launcher else [sys.executable, "-m", "chargpt"]
    return subprocess.Popen(
        [*cmd, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def losses(run) -> list[tuple[float, float]]:
    return [
        (r["train_loss"], r["val_loss"]) for r in map(json.loads, (run / "metrics.jsonl").open())
    ]


def max_weight_difference(a, b) -> float:
    wa, wb = load_file(str(a / "last.safetensors")), load_file(str(b / "last.safetensors"))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa if k.startswith("model."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Eight steps in one process, accumulating two micro-batches a step: what two processes
    with one micro-batch each must reproduce, and the run that fine-tuning starts from."""
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", "--out", str(run), *TINY, *SCHEDULE, "--grad-accum", "2"]) == 0
    return run


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> tuple[Path, str]:
    """The run of two torchrun agents with one process each, joined over localhost, and their
    stderr together. No flag beyond torchrun's: --grad-accum defaults to one micro-batch per
    process."""
    out = tmp_path_factory.mktemp("two_nodes") / "run"
    port = str(free_port())
    node = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1"]
    node += ["--master_addr", "127.0.0.1", "--master_port", port]
    nodes = [
        chargpt("train", "--out", str(out), *TINY, *SCHEDULE, launcher=(*node, "--node_rank", rank))
        for rank in ("0", "1")
    ]
    return out, "".join(finish(n) for n in nodes)


def test_two_processes_match_one_process_accumulating_two_micro_batches(two_nodes, single):
    ddp, err = two_nodes
    assert f"2 processes ({backend()})" in err and err.count("best val loss") == 1  # rank 0 alone
    assert json.loads((ddp / "config.json").read_text())["train"]["grad_accum"] == 2
    for (t1, v1), (t2, v2) in zip(losses(ddp), losses(single), strict=True):
        assert abs(t1 - t2) < TOLERANCE and abs(v1 - v2) < TOLERANCE
    assert max_weight_difference(ddp, single) < TOLERANCE
    run = load_run(ddp)  # rank 0's run directory loads like any other
    assert run.model(torch.zeros(1, 4, dtype=torch.long))[0].shape == (
        1,
        4,
        run.tokenizer.vocab_size,
    )


def test_two_nodes_on_localhost(two_nodes):
    out, _ = two_nodes
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").open())] == [0, 4, 8]
    load_run(out)


# chargpt's command line, counting this process's gloo threads (listed in Linux's /proc) as it
# leaves the process group
THREADS_LEFT = """
import os, sys
import torch.distributed as dist
from chargpt.cli.main import main

def gloo_threads():
    names = [open(f"/proc/self/task/{task}/comm").read() for task in os.listdir("/proc/self/task")]
    return sum("gloo" in name for name in names)

def destroy_counting(destroy=dist.destroy_process_group):
    print("gloo threads before:", gloo_threads())
    destroy()
    print("gloo threads after:", gloo_threads())

dist.destroy_process_group = destroy_counting
sys.exit(main(sys.argv[1:]))
"""
PROC_TASKS = os.path.isdir("/proc/self/task")


@pytest.fixture(scope="module")
def dropout_runs(tmp_path_factory) -> tuple[Path, Path, set[str], str]:
    """Two processes with dropout: 4 steps, then resumed to 8 by chargpt's command line counting
    its gloo threads as it leaves the process group; the same 8 steps straight; the tensors saved
    at step 4; the resumed processes' stdout."""
    root = tmp_path_factory.mktemp("dropout")
    split, straight, script = root / "split", root / "straight", root / "threads_left.py"
    flags = [*TINY, "--dropout", "0.1", "--warmup-iters", "2"]
    first_half = [*flags, "--max-iters", "4", "--lr-decay-iters", "8"]  # the later flag wins
    finish(chargpt("train", "--out", str(split), *first_half, launcher=TWO_PROCESSES))
    saved_at_4 = set(load_file(str(split / LAST)).keys())
    script.write_text(THREADS_LEFT)
    # a resume: a new run happens to build a model (which imports torch._dynamo) before joining
    command = [str(script)] if PROC_TASKS else ["-m", "chargpt"]
    args = [*TWO_PROCESSES, *command, "train", "--resume", str(split), "--max-iters", "8"]
    resumed = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finish(chargpt("train", "--out", str(straight), *flags, launcher=TWO_PROCESSES))
    return split, straight, saved_at_4, resumed.stdout


def test_a_two_process_run_with_dropout_resumes_exactly(dropout_runs):
    """Each process draws its own dropout masks, before and after a resume: every process's
    random state is saved, not only rank 0's."""
    split, straight, saved_at_4, _ = dropout_runs
    assert {"rng.rank0.torch", "rng.rank1.torch"} <= saved_at_4
    assert max_weight_difference(split, straight) < TOLERANCE


@pytest.mark.skipif(not PROC_TASKS, reason="reads Linux's /proc")
def test_a_finished_run_leaves_no_gloo_threads_running(dropout_runs):
    """The process group is gone when training ends: gloo's threads, left running into
    interpreter shutdown, can abort the process (SIGABRT) as they free a collective's tensors
    (a resumed two-process run failed so, about one time in fifteen, before the fix)."""
    *_, stdout = dropout_runs
    before = re.findall(r"gloo threads before: (\d+)", stdout)
    after = re.findall(r"gloo threads after: (\d+)", stdout)
    assert len(before) == 2 and all(int(n) > 0 for n in before), stdout  # they were there
    assert after == ["0", "0"], stdout


def test_two_processes_agree_on_the_end_of_a_time_budget(tmp_path):
    """With --max-time, the processes share rank-agreed elapsed time: they stop at one step (or
    one of them would wait for the others for ever) with the schedule at min_lr; Muon and EMA
    run under DDP too."""
    run = tmp_path / "ddp"
    recipe = ["--optimizer", "muon", "--ema-decay", "0.9", "--log-interval", "2"]
    timed = ["--max-time", "2s", "--eval-interval", "1000", *recipe]
    finish(chargpt("train", "--out", str(run), *TINY, *timed, launcher=TWO_PROCESSES))
    last = [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]
    assert last["step"] > 8 and last["step"] % 2 == 0  # past max_iters; at a log interval
    assert last["lr"] == pytest.approx(1e-3)  # the tiny preset's min_lr
    assert last["elapsed"] > 1.5  # rank 0's own clock; the agreed one (the largest) reached 2


def test_a_two_process_fine_tune_resumes_in_one_process_as_one_process_accumulating_two(
    tmp_path, single
):
    """`--init-from` under torchrun: every process starts from the run's weights, resized to
    the joined vocabulary the same way; and the two-process run, stopped at step 4, resumes in
    one process on the same batches, ending where one process accumulating two micro-batches
    does in 8 steps."""
    ddp, alone = tmp_path / "ddp", tmp_path / "alone"
    tune = [*TINY, "--init-from", str(single), "--data", "cartas", *SCHEDULE]
    half = [*tune, "--max-iters", "4"]  # the later flag wins
    finish(chargpt("train", "--out", str(ddp), *half, launcher=TWO_PROCESSES))
    assert main(["train", "--resume", str(ddp), "--max-iters", "8"]) == 0
    assert main(["train", "--out", str(alone), *tune, "--grad-accum", "2"]) == 0
    assert max_weight_difference(ddp, alone) < TOLERANCE
    assert load_run(ddp).tokenizer.vocab_size == load_run(single).tokenizer.vocab_size + 11


def test_every_process_group_maps_cpu_to_gloo_and_cuda_to_nccl(monkeypatch):
    """Loss totals, the stop flag and random states are CPU tensors, also when the gradients
    are on GPUs: the one process group sends each to the backend of its device."""
    backends = []
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: backends.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world, device = init_world(torch.device("cpu"))
    assert backends == ["cpu:gloo,cuda:nccl"]
    assert (world, device) == (World(rank=1, local_rank=1, size=2), torch.device("cpu"))


def test_micro_batches_are_shared_out_evenly():
    assert micro_batch_streams(4, World(rank=1, local_rank=1, size=2)) == range(2, 4)
    assert micro_batch_streams(1, World()) == range(0, 1)
    with pytest.raises(
        ChargptError, match="not a multiple of the 2 processes: pass --grad-accum 4"
    ):
        micro_batch_streams(3, World(rank=0, local_rank=0, size=2))
