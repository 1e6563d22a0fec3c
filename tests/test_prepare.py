import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chargpt.cli.main import main
from chargpt.data.codepoints import IdTable, code_points
from chargpt.data.corpus import resolve_corpus_path
from chargpt.data.dataset import CharDataset, load_corpus, load_prepared
from chargpt.data.prepare import prepare
from chargpt.data.tokenizer import CharTokenizer, UnknownCharactersError
from chargpt.errors import ChargptError


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
    # sorted order, the markdown file left out; a.txt lacks a final newline, so it gets one
    a, b = parts["a.txt"] + "\n", parts["sub/b.txt"]
    cut_a, cut_b = int(0.9 * len(a)), int(0.9 * len(b))
    assert tokenizer == CharTokenizer.from_text(a + b)
    assert tokenizer.decode(dataset.train.tolist()) == a[:cut_a] + b[:cut_b]
    assert tokenizer.decode(dataset.val.tolist()) == a[cut_a:] + b[cut_b:]


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


def test_each_file_gives_its_last_tenth_to_validation(tmp_path):
    """Validation samples every file, and a file without a final newline gets one, so that
    its last line does not run into the next file's first."""
    (tmp_path / "1.txt").write_text("a" * 50)
    (tmp_path / "2.txt").write_text("b" * 19 + "\n")
    prepare([tmp_path], tmp_path / "out", progress=False)
    dataset, tokenizer = load_prepared(tmp_path / "out")
    # 1.txt: 50 + 1 characters, 45 of them train; 2.txt: 20 characters, 18 of them train
    assert tokenizer.decode(dataset.train.tolist()) == "a" * 45 + "b" * 18
    assert tokenizer.decode(dataset.val.tolist()) == "aaaaa\n" + "b\n"


def test_the_fingerprint_covers_the_token_arrays(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcabc" * 20)
    prepare([corpus], tmp_path / "one", progress=False)
    prepare([corpus], tmp_path / "again", progress=False)
    corpus.write_text("cbacba" * 20)  # same path, characters and length: other tokens only
    prepare([corpus], tmp_path / "two", progress=False)
    one, again, two = (load_corpus(tmp_path / name)[2] for name in ("one", "again", "two"))
    assert one == again != two


def test_train_eval_and_resume_on_a_prepared_directory(tmp_path, capsys):
    corpus, data = tmp_path / "corpus", tmp_path / "data"
    corpus.mkdir()
    for name, line in (("a.txt", "to be or not to be. "), ("b.txt", "that is the question. ")):
        (corpus / name).write_text(line * 60)
    assert main(["prepare", "--data", str(corpus), "--out", str(data)]) == 0
    run = tmp_path / "run"
    tiny = ["--preset", "tiny", "--block-size", "8", "--eval-interval", "3", "--sample-chars", "0"]
    assert main(["train", "--out", str(run), "--data", str(data), *tiny, "--max-iters", "6"]) == 0
    config = json.loads((run / "config.json").read_text())
    info = json.loads((data / "vocab.json").read_text())
    assert (config["data"], config["data_sha256"]) == (str(data.resolve()), info["sha256"])
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["characters"] == info["val_tokens"]
    assert main(["train", "--resume", str(run), "--max-iters", "8"]) == 0
    shutil.rmtree(data)  # prepared again from other text with the same characters
    (corpus / "b.txt").write_text("that is the question. "[::-1] * 60)
    assert main(["prepare", "--data", str(corpus), "--out", str(data)]) == 0
    assert main(["train", "--resume", str(run), "--max-iters", "10"]) == 2
    assert "is not the text" in capsys.readouterr().err


def reference_prepare(files: list[bytes], encoding_errors: str) -> tuple[str, str, str]:
    """What `prepare` must write, computed the plain way: each file decoded whole, the sorted
    set of characters, the lab's split within each file. Returns (chars, train, val)."""
    texts = [data.decode("utf-8", encoding_errors) for data in files]
    if len(texts) > 1:
        texts = [t + "\n" if t and not t.endswith("\n") else t for t in texts]
    train = "".join(t[: int(0.9 * len(t))] for t in texts)
    val = "".join(t[int(0.9 * len(t)) :] for t in texts)
    return "".join(sorted(set(train + val))), train, val


# text where ASCII mixes with 2-, 3- and 4-byte characters, so that small chunks cut inside them
mixed_text = st.text(
    st.one_of(
        st.sampled_from("ab \n.,"),
        st.characters(min_codepoint=0x80, max_codepoint=0x7FF),
        st.characters(min_codepoint=0x800, max_codepoint=0xFFFF, exclude_categories=("Cs",)),
        st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF),
    ),
    max_size=60,
).filter(lambda text: "\x00" not in text)
file_bytes = st.one_of(
    mixed_text.map(lambda text: text.encode("utf-8")),
    st.binary(max_size=40).filter(lambda data: b"\x00" not in data),  # mostly not UTF-8
)


@settings(max_examples=100, deadline=None)
@given(
    files=st.lists(file_bytes, min_size=1, max_size=3),
    chunk_bytes=st.integers(1, 9),
    encoding_errors=st.sampled_from(["strict", "replace", "ignore"]),
)
def test_prepared_tokens_equal_a_plain_reference_encoding(files, chunk_bytes, encoding_errors):
    try:
        chars, train, val = reference_prepare(files, encoding_errors)
    except UnicodeDecodeError:
        chars = None
    with tempfile.TemporaryDirectory() as tmp:
        corpus, out = Path(tmp) / "corpus", Path(tmp) / "out"
        corpus.mkdir()
        for i, data in enumerate(files):
            (corpus / f"{i}.txt").write_bytes(data)
        if chars is None:  # not UTF-8: a clear error, and nothing written
            with pytest.raises(ChargptError, match="UTF-8"):
                prepare(
                    [corpus],
                    out,
                    encoding_errors=encoding_errors,
                    chunk_bytes=chunk_bytes,
                    progress=False,
                )
            assert not out.exists() or not any(out.iterdir())
            return
        if not chars:
            with pytest.raises(ChargptError, match="empty"):
                prepare(
                    [corpus],
                    out,
                    encoding_errors=encoding_errors,
                    chunk_bytes=chunk_bytes,
                    progress=False,
                )
            return
        prepare(
            [corpus], out, encoding_errors=encoding_errors, chunk_bytes=chunk_bytes, progress=False
        )
        dataset, tokenizer = load_prepared(out)
        assert "".join(tokenizer.chars) == chars
        assert [tokenizer.chars[i] for i in dataset.train] == list(train)
        assert [tokenizer.chars[i] for i in dataset.val] == list(val)


def test_the_id_table_agrees_with_the_tokenizer_at_the_uint8_boundary():
    # 256 characters: ids fill uint8, so the table marks unknown characters in a wider type
    tokenizer = CharTokenizer(tuple(chr(c) for c in range(32, 288)))
    text = "".join(reversed(tokenizer.chars)) + "ÿĀ ~"
    table = IdTable(tokenizer.chars)
    ids = table.ids(code_points(text))
    assert ids.dtype == np.uint8 and np.array_equal(ids, tokenizer.encode_array(text))
    ascii_ids = table.ids(code_points(b"hello"))  # a pure-ASCII chunk, as its bytes
    assert ascii_ids.tolist() == tokenizer.encode("hello")
    with pytest.raises(UnknownCharactersError, match=r"1 character\(s\).*'\\n'"):
        table.ids(code_points("ab\ncd"))


def test_the_prepare_command_does_not_import_torch(tmp_path):
    (tmp_path / "t.txt").write_text("some text, enough of it " * 10)
    code = (
        "import sys; from chargpt.__main__ import main; "
        f"status = main(['prepare', '--data', {str(tmp_path / 't.txt')!r}, "
        f"'--out', {str(tmp_path / 'out')!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(status)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "next: chargpt train --data" in result.stdout
    assert load_prepared(tmp_path / "out")[1].vocab_size == len(set("some text, enough of it "))
