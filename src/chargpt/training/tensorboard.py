"""`chargpt train --tensorboard`: a run's curves as TensorBoard event files in its run directory,
beside metrics.jsonl and loss.png, so that `tensorboard --logdir runs` shows every run under
`runs/` side by side. Needs the `tensorboard` extra.

Logged: the training loss at every report (every `log_interval` steps), with the learning rate of
each optimiser (AdamW's, and Muon's with --optimizer muon) and the tokens per second; the train
and val loss estimates at every evaluation; the evaluation's sample as text. Each session of a
run writes its own event file into the directory; a resumed session starts with a purge of the
steps after its saved state (`purge_step`: those steps are trained again), so the curves go on
from where the state was saved, as one line.
"""

from __future__ import annotations

from pathlib import Path

from chargpt.errors import ChargptError


class TensorBoardLog:
    """The event-file writer of one session of a run: into `run_dir`, or with None, nowhere (its
    methods then do nothing). `saved_step` is the step of the saved state a resumed session goes
    on from (-1: a new run). Use it as a context manager, which closes it."""

    def __init__(self, run_dir: Path | None = None, saved_step: int = -1) -> None:
        self.writer = None
        if run_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ChargptError(
                "--tensorboard needs the tensorboard package: pip install 'chargpt[tensorboard]'"
            ) from None
        # a resumed session hides what an earlier one logged after the saved step
        purge_step = saved_step + 1 if saved_step >= 0 else None
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes

    def training(
        self, step: int, loss: float, learning_rates: dict[str, float], tokens_per_s: float
    ) -> None:
        """The mean training loss of the steps since the last report, and how they went: the
        learning rate of the last step, by optimiser (adamw, muon)."""
        if self.writer is None:
            return
        self.writer.add_scalar("loss/train_steps", loss, step)
        for name, lr in learning_rates.items():
            self.writer.add_scalar(f"learning_rate/{name}", lr, step)
        if tokens_per_s:
            self.writer.add_scalar("tokens_per_s", tokens_per_s, step)

    def evaluation(self, step: int, losses: dict[str, float], sample: str) -> None:
        """The loss estimates (`train`, `val`) and the sample of one evaluation."""
        if self.writer is None:
            return
        for split, value in losses.items():
            self.writer.add_scalar(f"loss/{split}", value, step)
        if sample:  # TensorBoard renders text as Markdown: indented, it is shown as it is
            self.writer.add_text("sample", "    " + sample.replace("\n", "\n    "), step)
