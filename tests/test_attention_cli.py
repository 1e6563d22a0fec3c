import struct

import pytest
import torch

from chargpt.cli.main import main
from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.model import build_model
from chargpt.runs.directory import save_run

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = CharTokenizer.from_text("ROMEO: but soft, what light\n")
DPI = 120  # pixels per inch of every chargpt figure


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk, which always follows the 8-byte signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Untrained run directories: a 2-layer, 4-head GPT with a 16-character context, a bigram."""
    root = tmp_path_factory.mktemp("attention")
    torch.manual_seed(0)
    for kind in ("gpt", "bigram"):
        config = ModelConfig(model=kind, block_size=16, n_embd=32, n_head=4, n_layer=2)
        model = build_model(config, TOKENIZER.vocab_size)
        save_run(root / kind, model, TOKENIZER, config, TrainConfig(), step=0)
    return root


def attention(runs, out, *flags, run="gpt", text="ROMEO: but soft") -> int:
    return main(["attention", "--run", str(runs / run), "--text", text, "--out", str(out), *flags])


def test_grid_has_a_two_inch_cell_per_head_and_layer(runs, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert attention(runs, out) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    # 4 heads across plus a colour bar (1 in), 2 layers down plus a title (0.7 in)
    assert png_size(out) == ((4 * 2 + 1) * DPI, round((2 * 2 + 0.7) * DPI))


def test_one_layer_is_one_row(runs, tmp_path):
    out = tmp_path / "layer.png"
    assert attention(runs, out, "--layer", "1") == 0
    assert png_size(out) == ((4 * 2 + 1) * DPI, round((1 * 2 + 0.7) * DPI))


def test_one_head_is_one_large_matrix_and_replaces_the_old_file(runs, tmp_path):
    out = tmp_path / "head.png"
    out.write_bytes(b"an older picture")
    assert attention(runs, out, "--layer", "1", "--head", "3") == 0
    assert png_size(out) == (7 * DPI, 6 * DPI)  # 6 in square for short texts, 1 in colour bar
    assert [p.name for p in tmp_path.iterdir()] == ["head.png"]  # no temporary file left


@pytest.mark.parametrize(
    ("flags", "text", "message"),
    [
        (["--layer", "2"], "RO", "--layer 2 does not exist: the model has 2 layers: pass 0 to 1"),
        (["--head", "-1"], "RO", "--head -1 does not exist: the model has 4 heads: pass 0 to 3"),
        ([], "ROMEO!", "not in the vocabulary: '!': remove them"),
        ([], "R" * 17, "the text has 17 characters but the model reads at most 16"),
    ],
)
def test_bad_layer_head_or_text_is_one_line_and_writes_nothing(
    runs, tmp_path, capsys, flags, text, message
):
    assert attention(runs, tmp_path / "x.png", *flags, text=text) == 2
    err = capsys.readouterr().err
    assert err.startswith("chargpt attention: error: ") and message in err
    assert err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_a_bigram_has_no_attention_to_draw(runs, tmp_path, capsys):
    assert attention(runs, tmp_path / "x.png", run="bigram") == 2
    err = capsys.readouterr().err
    assert "a bigram model has no attention" in err and "pass a GPT run" in err
    assert err.count("\n") == 1
