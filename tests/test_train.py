"""The training loop: what it draws, how often it waits for the device, precision and compile."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.dataset import CharDataset
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model.precision import tf32_matmuls
from chargpt.training.distributed import World
from chargpt.training.optim import lr_multiplier
from chargpt.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "to be or not to be, that is the question: whether 'tis nobler in the mind. " * 40
MODEL = ModelConfig(block_size=8, n_embd=16, n_head=2, n_layer=1, dropout=0.0)
TRAIN = TrainConfig(
    batch_size=4, max_iters=4, eval_interval=2, eval_iters=2, sample_chars=0, device="cpu"
)


def make_trainer(out: Path, **changes) -> Trainer:
    tokenizer = CharTokenizer.from_text(TEXT)
    dataset = CharDataset.from_text(TEXT, tokenizer)
    return Trainer(MODEL, dataclasses.replace(TRAIN, **changes), dataset, tokenizer, out)


def test_estimates_never_score_the_batches_training_draws(tmp_path: Path) -> None:
    """With several micro-batches a step, the lab estimate of the training loss must score
    other windows than the micro-batch streams train on."""
    trainer = make_trainer(tmp_path, grad_accum=3, eval_interval=1, max_iters=3)
    drawn: dict[str, list[torch.Tensor]] = {"training": [], "estimate": []}
    get_batch, train_step = trainer.dataset.get_batch, trainer.train_step
    phase = "estimate"

    def recording_get_batch(split, *args, **kwargs):
        x, y = get_batch(split, *args, **kwargs)
        if split == "train":
            drawn[phase].append(x)
        return x, y

    def recording_train_step() -> torch.Tensor:
        nonlocal phase
        phase = "training"
        try:
            return train_step()
        finally:
            phase = "estimate"

    trainer.dataset.get_batch = recording_get_batch
    trainer.train_step = recording_train_step
    trainer.run()
    assert len(drawn["training"]) == 9 and len(drawn["estimate"]) == 4 * 2
    for estimated in drawn["estimate"]:
        assert not any(torch.equal(estimated, trained) for trained in drawn["training"])


def test_the_loss_is_read_once_per_log_interval(tmp_path: Path, monkeypatch) -> None:
    """Reading the loss waits for the device, and under torchrun for every process: the loop
    does it every `log_interval` steps (and before each estimate), not at every step."""
    reads = []

    def counting_all_reduce(values, world, op="sum"):
        reads.append(values)
        return values

    monkeypatch.setattr("chargpt.training.trainer.all_reduce", counting_all_reduce)
    trainer = make_trainer(tmp_path, max_iters=20, eval_interval=20, log_interval=5)
    trainer.run()
    assert len(reads) == 4  # after steps 5, 10, 15 and 20


def test_processes_agree_on_stopping_once_per_log_interval(tmp_path: Path, monkeypatch) -> None:
    trainer = make_trainer(tmp_path, log_interval=4)
    trainer.world = World(rank=0, local_rank=0, size=2)  # as under torchrun
    exchanged = []

    def other_process_stops(values, world, op="sum"):
        exchanged.append(trainer.step)
        return torch.maximum(values, torch.tensor([15]))  # the other process got SIGTERM

    monkeypatch.setattr("chargpt.training.trainer.all_reduce", other_process_stops)
    stops = []
    for step in range(1, 9):
        trainer.step = step
        stops.append(trainer.stop_requested())
    assert exchanged == [4, 8]  # every process reaches these steps, so all stop at step 4
    assert stops == [False, False, False, True] * 2 and trainer.stop_signal == 15


def test_training_appends_to_metrics_instead_of_rewriting_it(tmp_path, monkeypatch) -> None:
    import chargpt.data.files

    rewritten = []
    atomic_write = chargpt.data.files.atomic_write

    def recording_atomic_write(path, write):
        rewritten.append(Path(path).name)
        atomic_write(path, write)

    monkeypatch.setattr(chargpt.data.files, "atomic_write", recording_atomic_write)
    make_trainer(tmp_path, eval_interval=1).run()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    assert "metrics.jsonl" not in rewritten


def test_the_step_rate_follows_the_schedule_fixed_at_the_start(tmp_path: Path) -> None:
    """lr_decay_iters defaults to the first max_iters and is saved with the run, so a later,
    longer max_iters does not stretch the decay."""
    cosine = dict(learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lr_schedule="cosine")
    trainer = make_trainer(tmp_path, max_iters=10, **cosine)
    assert trainer.cfg.lr_decay_iters == 10
    longer = dataclasses.replace(trainer.cfg, max_iters=40)
    rates = [lr_multiplier(step, longer) * 1e-2 for step in range(40)]
    assert rates[:2] == pytest.approx([5e-3, 1e-2])  # warmup
    assert rates[2:10] == sorted(rates[2:10], reverse=True)  # cosine over steps 2..10
    assert rates[10:] == pytest.approx([1e-3] * 30)  # then min_lr, never higher


def test_bf16_autocast_trains_on_the_cpu(tmp_path: Path) -> None:
    fp32 = make_trainer(tmp_path / "fp32", dtype="fp32").run()
    trainer = make_trainer(tmp_path / "bf16", dtype="bf16")
    assert trainer.dtype == torch.bfloat16
    result = trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights
    assert result.best_val_loss == pytest.approx(fp32.best_val_loss, abs=0.05)


@pytest.fixture(scope="module")
def compile_works() -> None:
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as err:  # no C++ compiler, unsupported platform, ...
        pytest.skip(f"torch.compile is unavailable here: {type(err).__name__}")


def test_compiled_training_matches_eager_training(tmp_path: Path, compile_works) -> None:
    settings = dict(dtype="fp32", max_iters=3, eval_interval=3)
    eager = make_trainer(tmp_path / "eager", **settings).run()
    compiled = make_trainer(tmp_path / "compiled", compile=True, **settings).run()
    assert compiled.best_val_loss == pytest.approx(eager.best_val_loss, abs=1e-4)


def test_a_trainer_leaves_torch_global_random_state_alone(tmp_path: Path) -> None:
    """Python users keep their own random streams: building and running a trainer neither
    seeds nor draws from torch's global generator, and a trainer's results do not depend on
    what was drawn, or which other trainer was built, before it runs."""
    dropout = dataclasses.replace(MODEL, dropout=0.1)
    tokenizer = CharTokenizer.from_text(TEXT)
    dataset = CharDataset.from_text(TEXT, tokenizer)

    def trainer(out: str, seed: int) -> Trainer:
        cfg = dataclasses.replace(TRAIN, seed=seed, dtype="fp32")
        return Trainer(dropout, cfg, dataset, tokenizer, tmp_path / out)

    alone = trainer("alone", seed=1).run()
    torch.manual_seed(123)
    torch.rand(7)
    expected = torch.rand(4)  # the caller's stream, had no trainer been built or run

    torch.manual_seed(123)
    first, second = trainer("first", seed=1), trainer("second", seed=2)
    torch.rand(7)
    result = first.run()
    second.run()
    assert torch.equal(torch.rand(4), expected)
    assert result.best_val_loss == alone.best_val_loss
    for name, weight in alone.model.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], weight), name


def test_tf32_is_on_only_inside_a_cuda_training_run() -> None:
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    with tf32_matmuls(torch.device("cpu")):
        assert matmul.allow_tf32 == before
    with pytest.raises(RuntimeError), tf32_matmuls(torch.device("cuda")):
        assert matmul.allow_tf32
        raise RuntimeError("a failed step")
    assert matmul.allow_tf32 == before
