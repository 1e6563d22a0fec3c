"""notebooks/laboratorio_gpt.ipynb, the lab walked through with chargpt's classes, runs top to
bottom at tiny sizes: its `parameters` cell is overridden papermill-style (a cell injected after
it), and the notebook is executed by nbclient in an IPython kernel of this interpreter."""

from __future__ import annotations

import ast
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

from chargpt.config.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "laboratorio_gpt.ipynb"
LAB_ASSERT = (
    'assert encode("hola, que tal?") == [46, 53, 50, 39, 6, 1, 55, 59, 43, 1, 58, 39, 50, 12]'
)
LAB_IDS = "[46, 53, 50, 39, 6, 1, 55, 59, 43, 1, 58, 39, 50, 12]"
# the notebook's parameters at the `tiny` preset's values: the whole notebook in well under a
# minute on 2 cores
NAMES = ("n_embd", "n_head", "n_layer", "block_size", "batch_size", "max_iters", "eval_interval")
TINY = {name: PRESETS["tiny"][name] for name in (*NAMES, "eval_iters", "learning_rate")}
TINY["device"] = "cpu"


def read_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def parameters_cell(cells: list[dict]) -> int:
    tagged = [i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged `parameters`"
    return tagged[0]


def test_notebook_is_committed_clean():
    """No outputs or execution counts in the repository, and a `parameters` cell to override."""
    cells = read_notebook()["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    params = cells[parameters_cell(cells)]
    assigned = {
        target.id
        for node in ast.parse(source(params)).body
        if isinstance(node, ast.Assign)
        for target in node.targets
    }
    assert set(TINY) | {"run_root", "seed"} <= assigned


def outputs_of(cell) -> list:
    return cell.get("outputs", [])


def text_of(cell) -> str:
    parts = []
    for out in outputs_of(cell):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/markdown", "") + out["data"].get("text/plain", ""))
    return "".join(parts)


def test_notebook_runs_top_to_bottom_at_tiny_sizes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(NOTEBOOK, as_version=4)
    run_root = tmp_path / "runs"
    values = {**TINY, "run_root": str(run_root)}
    injected = nbformat.v4.new_code_cell(
        "\n".join(f"{name} = {value!r}" for name, value in values.items())
    )
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(parameters_cell(nb.cells) + 1, injected)

    # the kernel imports chargpt from this checkout (CI also has it installed) and runs tiny
    # models on one thread, which is faster than two on a busy 2-core machine
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # ipykernel's own spec for this interpreter (no kernel directories searched): the kernel is
    # sys.executable, whichever venv runs pytest
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    assert km.kernel_spec.argv[0] == sys.executable
    client = nbclient.NotebookClient(
        nb, km=km, timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    began = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - began

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every code cell ran"
    errors = [out for c in code for out in outputs_of(c) if out["output_type"] == "error"]
    assert not errors
    lab_assert = next(c for c in code if LAB_ASSERT in c.source)
    assert LAB_IDS in text_of(lab_assert)
    images = [out for c in code for out in outputs_of(c) if "image/png" in out.get("data", {})]
    # wei before training, the loss curve, wei before/after, the comparison's curves
    assert len(images) >= 4
    table = "".join(text_of(c) for c in code)
    assert "| **bigram** |" in table and "| **gpt** |" in table

    # the trained GPT beats a uniform guess over the vocabulary, ln(vocab_size)
    vocab_size = len(
        json.loads((run_root / "gpt" / "config.json").read_text())["tokenizer"]["chars"]
    )
    gpt, bigram = (
        [json.loads(line) for line in (run_root / name / "metrics.jsonl").open()]
        for name in ("gpt", "bigram")
    )
    assert gpt[-1]["step"] == bigram[-1]["step"] == TINY["max_iters"]
    assert gpt[-1]["val_loss"] < math.log(vocab_size) - 1.0
    # part j: under the same budget the GPT beats the bigram
    assert gpt[-1]["val_loss"] < bigram[-1]["val_loss"]
    assert (run_root / "report.md").is_file()
    print(f"tiny notebook executed in {elapsed:.1f} s")
