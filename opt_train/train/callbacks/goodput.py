"""Goodput rows: the trainer's ledger (opt_train/train/goodput.py) written to metrics.jsonl
after every evaluation and at the end, and fed the events it cannot see from the loop: the
rows a killed process left, rollbacks and failed saves.

First among the callbacks: it reads metrics.jsonl before the file sink drops a killed
process's rows, marks each step's start before any other callback's pre_step, and writes the
final row (in on_close) after every other callback's on_end (the final save included).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from opt_train.train.callbacks.base import Callback
from opt_train.train.metric_rows import row_kind
from opt_train.train.run_files import row_step

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer


class Goodput(Callback):
    """A `{"event": "goodput", "step": N, "goodput": fraction, "goodput/<kind>_s": ...}` row
    after each evaluation (written when the step's post-step work is done) and at the end,
    by rank 0: the last goodput row of metrics.jsonl is the run's whole ledger."""

    def __init__(self) -> None:
        self._pending: int | None = None  # the step of an evaluation not yet followed by a row

    def on_start(self, trainer: Trainer) -> None:
        ledger = trainer.goodput
        if trainer.resumed_from:
            ledger.restarted()
        if trainer.dist.is_main:
            ledger.saw_steps(last_step_logged(trainer.run_dir / "metrics.jsonl"))

    def pre_step(self, trainer: Trainer) -> None:
        self._flush(trainer)
        trainer.goodput.begin_step(trainer.step)

    def on_log(self, trainer: Trainer, row: dict) -> None:
        kind = row_kind(row)
        if kind == "eval":
            self._pending = row["step"]
        elif row.get("event") == "checkpoint_failed":
            trainer.goodput.save_failed(row["step"])
        elif row.get("event") == "rollback":
            trainer.goodput.rolled_back(row["step"])

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        if error is None:
            self._pending = None
            if trainer.dist.is_main:
                trainer.log({"event": "goodput", "step": trainer.step, **trainer.goodput.row()})

    def _flush(self, trainer: Trainer) -> None:
        if self._pending is not None:
            step, self._pending = self._pending, None
            if trainer.dist.is_main:
                trainer.log({"event": "goodput", "step": step, **trainer.goodput.row()})


def last_step_logged(path) -> int:
    """The highest step of metrics.jsonl's rows (0 without any): how far the processes before
    this one trained, including past their last checkpoint."""
    last = 0
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a torn last line of a killed process
                    continue
                if row_step(row) is not None and row_kind(row) == "step":
                    last = max(last, row["step"])
    except FileNotFoundError:
        pass
    return last
