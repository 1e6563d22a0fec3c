import dataclasses
import json

import torch

from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import build_model
from chargpt.runs.directory import FORMAT_VERSION, load_run, save_run


def test_run_directory_round_trips_to_identical_logits(tmp_path, tiny_config):
    tok = CharTokenizer.from_text("abcdefghij \n")
    torch.manual_seed(0)
    model = build_model(tiny_config, tok.vocab_size).eval()
    save_run(tmp_path, model, tok, tiny_config, TrainConfig(), step=5, best_val_loss=1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    run = load_run(tmp_path)
    assert run.tokenizer == tok
    assert run.model_config == tiny_config
    assert run.meta["step"] == 5 and run.meta["best_val_loss"] == 1.5
    idx = torch.randint(tok.vocab_size, (2, tiny_config.block_size))
    assert torch.equal(run.model(idx)[0], model(idx)[0])
    # the same checkpoint serves the lab's reference attention path
    reference = load_run(tmp_path, attention="reference").model
    assert torch.allclose(reference(idx)[0], model(idx)[0], atol=1e-5, rtol=0)


def test_config_json_is_plain_json_with_everything_needed(tmp_path):
    tok = CharTokenizer.from_text("xyz")
    config = ModelConfig(model="bigram")
    save_run(tmp_path, build_model(config, 3), tok, config, TrainConfig(seed=3), step=1)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model"] == dataclasses.asdict(config)
    assert data["train"]["seed"] == 3
    assert data["tokenizer"] == {"type": "char", "chars": ["x", "y", "z"]}
    assert data["format_version"] == FORMAT_VERSION and "chargpt_version" in data
    assert load_run(tmp_path).model.token_embedding_table.weight.shape == (3, 3)
