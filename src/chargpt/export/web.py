"""`chargpt export --format web`: a static folder that runs the model in the browser.

    SITE/index.html       the page: prompt, streaming text, sampling controls, next-character bars
    SITE/chargpt.js       the decoding loop and `window.chargpt.generate` (docs/export.md)
    SITE/common.js        what the page's script shares with the playground's (bars, sampling)
    SITE/playground.css   the playground's stylesheet; SITE/chargpt.css the page's own rules
    SITE/model.onnx       the graph of chargpt.export.onnx_graph
    SITE/model.json       vocabulary, model config and the window rule's numbers
    SITE/ort.min.js, SITE/ort-wasm-simd-threaded.jsep.{mjs,wasm}   onnxruntime-web (WebAssembly)

Everything the page loads is in the folder, so any static host serves it (GitHub Pages,
`python -m http.server`). onnxruntime-web comes from `--ort-dir` (its dist/ folder), else from
the user cache, which `npm pack` fills once from the npm registry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

from chargpt.data.files import fsync_directory
from chargpt.errors import ChargptError
from chargpt.export.onnx_graph import FORMAT, export_model, exportable
from chargpt.generation.decoders import window_length
from chargpt.runs.directory import Run, load_run

ORT_WEB_VERSION = "1.31.1"  # the onnxruntime-web release the page is tested with
ORT_FILES = ("ort.min.js", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm")
PAGE_FILES = ("chargpt.js", "chargpt.css")  # and index.html, with CONTROLS written in
SHARED_FILES = ("playground.css", "common.js")  # the playground's (chargpt serve), shared
CONTROLS = "controls.html"  # the playground's prompt and sampling controls, shared
NPM_TIMEOUT = 600  # seconds for `npm pack` (a ~35 MB download)


def export_site(run_dir: Path, out: Path, ort_dir: Path | None = None) -> None:
    """Write the site folder `out` (which must not exist yet): whole, or not at all."""
    if out.exists():
        raise ChargptError(f"--out {out} already exists: pick a new folder for the site")
    if not out.parent.is_dir():
        raise ChargptError(f"--out {out}: the directory {out.parent} does not exist: create it")
    ort_files = onnxruntime_web(ort_dir)  # before the slow part: a missing npm fails at once
    run = load_run(run_dir, "cpu")
    exportable(run.model_config)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_site(run, run_dir, tmp, ort_files)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_directory(out.parent)


def write_site(run: Run, run_dir: Path, site: Path, ort_files: Path) -> None:
    export_model(run.model, run.tokenizer, site / "model.onnx")
    (site / "model.json").write_text(
        json.dumps(site_metadata(run, run_dir.name), ensure_ascii=False), encoding="utf-8"
    )
    page = resources.files("chargpt.export") / "site"
    for name in PAGE_FILES:
        (site / name).write_bytes((page / name).read_bytes())
    # the playground's files the page shares, read as package data (nothing of the server is
    # imported): its stylesheet, its script, and its controls, written into index.html
    playground = resources.files("chargpt") / "serve/static"
    for name in SHARED_FILES:
        (site / name).write_bytes((playground / name).read_bytes())
    index = (page / "index.html").read_text(encoding="utf-8")
    controls = (playground / CONTROLS).read_text(encoding="utf-8").strip()
    (site / "index.html").write_text(index.replace(f"<!-- {CONTROLS} -->", controls), "utf-8")
    for name in ORT_FILES:
        shutil.copyfile(ort_files / name, site / name)
    site.chmod(0o755)  # mkdtemp makes it 0700: a web server running as another user reads it


def site_metadata(run: Run, name: str) -> dict:
    """What chargpt.js needs besides the graph: the vocabulary and the window rule's numbers."""
    c = exportable(run.model_config)
    return {
        "format": FORMAT,
        "name": name,
        "vocab": list(run.tokenizer.chars),
        "model_config": dataclasses.asdict(c),
        "parameters": run.model.num_parameters(),
        "block_size": c.block_size,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "head_size": c.n_embd // c.n_head,
        # the decoders' window rule (generation.decoders.Window) at the default window_keep
        "window_keep_ids": window_length(c.block_size, 0.5),
        "step": run.meta.get("step"),
        "val_loss": run.meta.get("best_val_loss"),
        "onnxruntime_web": ORT_WEB_VERSION,
    }


def onnxruntime_web(ort_dir: Path | None) -> Path:
    """A folder holding ORT_FILES: `ort_dir`, or the user cache (filled by npm if empty)."""
    if ort_dir is not None:
        missing = [name for name in ORT_FILES if not (ort_dir / name).is_file()]
        if missing:
            raise ChargptError(
                f"--ort-dir {ort_dir} lacks {', '.join(missing)}: give onnxruntime-web's dist/ "
                f"folder (npm pack onnxruntime-web@{ORT_WEB_VERSION}, then extract package/dist)"
            )
        return ort_dir
    cached = cache_dir() / f"onnxruntime-web-{ORT_WEB_VERSION}"
    if all((cached / name).is_file() for name in ORT_FILES):
        return cached
    npm = shutil.which("npm")
    if npm is None:
        raise ChargptError(
            f"the web page needs onnxruntime-web {ORT_WEB_VERSION}: install npm (it is fetched "
            "once from the npm registry), or pass --ort-dir DIR holding its "
            f"{', '.join(ORT_FILES)}"
        )
    fetch_with_npm(npm, cached)
    return cached


def cache_dir() -> Path:
    """$CHARGPT_CACHE_DIR, else $XDG_CACHE_HOME/chargpt, else ~/.cache/chargpt."""
    if os.environ.get("CHARGPT_CACHE_DIR"):
        return Path(os.environ["CHARGPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chargpt"


def fetch_with_npm(npm: str, dest: Path) -> None:
    """`npm pack` the pinned onnxruntime-web release and keep only ORT_FILES from it, in `dest`
    (written whole: a folder renamed into place)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        spec = f"onnxruntime-web@{ORT_WEB_VERSION}"
        try:
            done = subprocess.run(
                [npm, "pack", spec, "--pack-destination", tmp, "--silent"],
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT,
                cwd=tmp,
            )
        except subprocess.TimeoutExpired:
            raise ChargptError(
                f"npm pack {spec} took over {NPM_TIMEOUT}s: check the network, or pass --ort-dir"
            ) from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ChargptError(f"npm pack {spec} failed ({last}): check npm, or pass --ort-dir")
        tarball = next(Path(tmp).glob("*.tgz"))
        files = Path(tmp) / "files"
        files.mkdir()
        with tarfile.open(tarball) as archive:
            for name in ORT_FILES:
                try:
                    source = archive.extractfile(f"package/dist/{name}")
                except KeyError:
                    source = None
                if source is None:
                    raise ChargptError(f"{spec} from npm has no dist/{name}: pass --ort-dir")
                (files / name).write_bytes(source.read())
        if dest.exists():  # another export filled it meanwhile
            return
        os.replace(files, dest)
