"""`chargpt export` and the onnxruntime backend of `chargpt sample` and `chargpt eval`. The
export extra (onnx, onnxscript, onnxruntime) is imported only here, when one of them runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from chargpt.config import SampleConfig
from chargpt.errors import ChargptError
from chargpt.generation.generate import TextPiece
from chargpt.generation.speed import Work
from chargpt.runs.directory import Run, read_run_config, run_configs

# what the `export` extra installs (onnx_ir and ml_dtypes come with onnxscript)
EXPORT_MODULES = {"onnx", "onnxscript", "onnx_ir", "onnxruntime", "ml_dtypes"}


@contextlib.contextmanager
def export_extra() -> Iterator[None]:
    """A missing package of the export extra is one line that says how to install it."""
    try:
        yield
    except ImportError as err:
        if (err.name or "").split(".")[0] not in EXPORT_MODULES:
            raise
        raise ChargptError(
            f"this needs the export extra ({err.name} is missing): pip install 'chargpt[export]'"
        ) from None


def cmd_export(args: argparse.Namespace) -> int:
    with export_extra():
        if args.format == "onnx":
            from chargpt.export.onnx_graph import export_run

            export_run(args.run, args.out)
            print(
                f"wrote {args.out}\nnext: chargpt sample --run {args.run} --backend onnxruntime "
                f"--onnx {args.out}"
            )
        else:
            from chargpt.export.web import export_site

            export_site(args.run, args.out, args.ort_dir)
            print(
                f"wrote {args.out}\nnext: python -m http.server -d {args.out} 8000, then open "
                "http://127.0.0.1:8000/"
            )
    return 0


def onnx_model(args: argparse.Namespace, work: Work):  # -> chargpt.export.runtime.OnnxModel
    """The graph of `--onnx FILE` (it must be the run's), or the run exported to a temporary
    file first (seconds to minutes: export once with `chargpt export` to skip it), in the
    session settings that run `work` fastest here."""
    from chargpt.export.onnx_graph import export_run
    from chargpt.export.runtime import OnnxModel

    if args.onnx:
        model = OnnxModel(args.onnx, work=work)
        check_same_model(args.run, model, Path(args.onnx))
        return model
    print(
        f"exporting {args.run} to ONNX first (pass --onnx FILE to reuse an export)", file=sys.stderr
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_run(args.run, path)
        return OnnxModel(path, work=work)  # the session holds the graph: the file may go


def check_same_model(run_dir: Path, model, path: Path) -> None:
    """An --onnx file made from another run is an error, not a silent substitute."""
    model_config, _, tokenizer = run_configs(run_dir, read_run_config(run_dir))
    exported = dataclasses.replace(model_config, attention="fused", dropout=0.0)
    if (model.config, model.tokenizer) != (exported, tokenizer):
        raise ChargptError(
            f"--onnx {path} was not exported from {run_dir} (another model config or "
            f"vocabulary): export it with chargpt export --run {run_dir}"
        )


def onnxruntime_sampler(args: argparse.Namespace, config: SampleConfig):
    """The graph (an OnnxModel: its vocabulary, its `job`) and the sampling function of
    `chargpt sample --backend onnxruntime`."""
    with export_extra():
        from chargpt.export.runtime import check_fp32, onnx_stream

        check_fp32(config.quantize, config.dtype)
        model = onnx_model(args, Work(rows=config.num_samples))

    def sampler(prompt: str, config: SampleConfig) -> Iterator[TextPiece]:
        return onnx_stream(model, prompt, config)

    return model, sampler


def onnxruntime_run(args: argparse.Namespace, run: Run) -> Run:
    """`run` scored through onnxruntime (`chargpt eval --backend onnxruntime`), on the CPU."""
    with export_extra():
        from chargpt.export.runtime import OnnxLanguageModel, check_fp32

        check_fp32(args.quantize)
        model = onnx_model(args, Work(scoring=True))
        return dataclasses.replace(run, model=OnnxLanguageModel(model))
