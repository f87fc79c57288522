"""The run's rows as TensorBoard scalars (`logging.tensorboard`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from opt_train.train.callbacks.base import Callback
from opt_train.train.metric_rows import flat_row

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer


class TensorBoard(Callback):
    """Scalars under `run_dir/tensorboard/` (`logging.tensorboard`), written by rank 0, with the
    names of metrics.jsonl (a nested dict such as `tokens_by_source` as `tokens_by_source/<name>`);
    event rows become text entries under `events`."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "tensorboard"
        self._writer = None

    def on_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run hides what a killed run wrote after its checkpoint (TensorBoard's
            # purge_step), as MetricsFile drops those rows.
            purge = trainer.step + 1 if trainer.step else None
            self._writer = SummaryWriter(str(self.dir), purge_step=purge)

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if self._writer is None:
            return
        step = row["step"]
        if "event" in row and row["event"] != "goodput":  # goodput rows are curves
            self._writer.add_text("events", json.dumps(row), step)
            return
        for name, value in flat_row(row).items():
            if name != "step" and isinstance(value, (int, float)):  # bool too (skipped: 0/1)
                self._writer.add_scalar(name, float(value), step)

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
