import numpy as np
import pytest

from chargpt.corpus import resolve_corpus_path
from chargpt.data import CharDataset, load_prepared
from chargpt.errors import ChargptError
from chargpt.prepare import prepare
from chargpt.tokenizer import CharTokenizer


def test_prepared_shakespeare_equals_the_in_memory_split(tmp_path, shakespeare):
    info = prepare([resolve_corpus_path("shakespeare")], tmp_path, progress=False)
    dataset, tokenizer = load_prepared(tmp_path)
    expected = CharDataset.from_text(shakespeare, CharTokenizer.from_text(shakespeare))
    assert tokenizer == CharTokenizer.from_text(shakespeare)
    assert info["dtype"] == "uint8" and isinstance(dataset.train, np.memmap)
    assert np.array_equal(dataset.train, expected.train)
    assert np.array_equal(dataset.val, expected.val)


def test_directories_globs_and_chunk_boundaries_inside_characters(tmp_path):
    # 3-byte and 4-byte characters, read 5 bytes at a time: every chunk boundary splits some
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    parts = {"a.txt": "añb€c😀" * 30, "sub/b.txt": "x😀y€z\n" * 40, "skip.md": "ignored"}
    for name, text in parts.items():
        (corpus / name).write_text(text, encoding="utf-8")
    out = tmp_path / "prepared"
    prepare([corpus], out, pattern="*.txt", chunk_bytes=5, progress=False)
    dataset, tokenizer = load_prepared(out)
    text = parts["a.txt"] + parts["sub/b.txt"]  # sorted order, the markdown file left out
    n = int(0.9 * len(text))
    assert tokenizer == CharTokenizer.from_text(text)
    assert tokenizer.decode(dataset.train.tolist()) == text[:n]
    assert tokenizer.decode(dataset.val.tolist()) == text[n:]


def test_large_vocabularies_use_uint16(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 2
    path = tmp_path / "cjk.txt"
    path.write_text(text, encoding="utf-8")
    info = prepare([path], tmp_path / "out", progress=False)
    dataset, tokenizer = load_prepared(tmp_path / "out")
    assert info["dtype"] == "uint16" and dataset.train.dtype == np.uint16
    assert tokenizer.decode(dataset.val.tolist()) == text[int(0.9 * len(text)) :]


def test_invalid_utf8_names_the_byte_and_can_be_replaced(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello world " * 3 + b"\xff tail")
    with pytest.raises(ChargptError, match=r"not valid UTF-8 \(near byte 36\).*--encoding-errors"):
        prepare([path], tmp_path / "out", chunk_bytes=8, progress=False)
    assert not (tmp_path / "out" / "vocab.json").exists()
    prepare([path], tmp_path / "out", encoding_errors="replace", progress=False)
    assert "\ufffd" in load_prepared(tmp_path / "out")[1].chars


def test_refuses_to_overwrite_and_reports_missing_inputs(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text here")
    prepare([path], tmp_path / "out", progress=False)
    with pytest.raises(ChargptError, match="already holds prepared data"):
        prepare([path], tmp_path / "out", progress=False)
    with pytest.raises(ChargptError, match="does not exist"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o2", progress=False)
    with pytest.raises(ChargptError, match="no files match"):
        prepare([tmp_path / "out"], tmp_path / "o3", pattern="*.txt", progress=False)


def test_a_truncated_array_is_detected(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text here, long enough")
    prepare([path], tmp_path / "out", progress=False)
    with (tmp_path / "out" / "train.bin").open("r+b") as f:
        f.truncate(3)
    with pytest.raises(ChargptError, match=r"does not match vocab\.json"):
        load_prepared(tmp_path / "out")
