"""`run_dir/metrics.jsonl`: the run's rows, one JSON object per line, written by rank 0."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from opt_train.train.callbacks.base import Callback
from opt_train.train.run_files import JsonlAppender, row_step, write_text_atomic

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer

log = logging.getLogger(__name__)


class MetricsFile(Callback):
    """`run_dir/metrics.jsonl`, one JSON object per row, written by rank 0."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None

    def on_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            _drop_rows_after(self.path, trainer.step)
            # Whole lines only; a failed write is reported and retried (train/run_files.py).
            self._file = JsonlAppender(self.path)
            if getattr(trainer, "config_write_error", None):
                trainer.log_event("config_write_failed", error=trainer.config_write_error)

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if self._file is not None:
            self._file.append(row)

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_rewind(self, trainer: Trainer, step: int, events: list[dict]) -> None:
        if self._file is not None:
            self._file.close()
            _drop_rows_after(self.path, step)
            self._file = JsonlAppender(self.path)
            for row in events:
                self._file.append(row)


def _drop_rows_after(path: Path, step: int) -> None:
    """A run killed after its last checkpoint logged steps that the resumed run repeats; keep
    one row per step by dropping those (and a torn last line) before appending. They are the
    file's tail, normally: it is cut there in place, which needs no free space (a full disk is
    a common reason a run was stopped); rows out of order get the file rewritten."""
    if not path.exists():
        return
    data = path.read_bytes()
    kept, cut, offset = [], None, 0
    for line in data.splitlines(keepends=True):
        start, offset = offset, offset + len(line)
        try:
            row = json.loads(line)
        except ValueError:  # torn JSON, or a line cut inside a UTF-8 character
            row = None
        if isinstance(row, dict) and row_step(row) is None:
            # A row not written by the run (a hand edit, another tool): kept as it is.
            log.warning(
                "%s: a row with step %r, not an integer: kept, skipped by readers",
                path,
                row.get("step"),
            )
        elif not isinstance(row, dict) or row_step(row) > step:
            cut = start if cut is None else cut
            continue
        if cut is not None or not line.endswith(b"\n"):  # not a plain tail to cut
            cut = -1
        kept.append(line if line.endswith(b"\n") else line + b"\n")
    if cut is None:
        return
    if cut >= 0:
        os.truncate(path, cut)
    else:
        write_text_atomic(path, b"".join(kept).decode("utf-8"))
