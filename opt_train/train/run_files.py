"""The run's own files beside its checkpoints: `metrics.jsonl` (appended, whole lines only)
and `config.yaml` (replaced atomically). A write that fails (disk full, EIO, quota, a
permission change) is reported in one line, with the free space seen, and never leaves a torn
file: a failed append is cut back to the last whole line and its rows are kept in memory and
written, after an event row saying so, once a write succeeds again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from data_pipeline.files import atomic_write, free_bytes, mib, os_error

log = logging.getLogger(__name__)

MAX_PENDING_ROWS = 100_000  # rows held while metrics.jsonl cannot be written; older ones go


def row_step(row) -> int | None:
    """A metrics.jsonl row's step: an int for a well-formed row (a JSON object whose `step` is
    an integer), else None. Every reader of metrics.jsonl asks this rather than indexing, so a
    row a person or another tool wrote by hand is skipped with a warning, never a TypeError
    that would block every later resume."""
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def write_text_atomic(path: Path, text: str) -> BaseException | None:
    """`atomic_write` that reports and goes on: a failure leaves the old file whole and is
    logged with the free space seen. Returns the error, already reported, or None."""
    try:
        atomic_write(path, text)
        return None
    except OSError as e:
        log.error(
            "could not write %s: %s; %s free on its filesystem; the run goes on (the "
            "resolved config is also in every checkpoint)",
            path,
            os_error(e),
            mib(free_bytes(path)),
        )
        return e


class JsonlAppender:
    """Appends rows to a JSONL file, each write whole lines or nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pending: list[str] = []
        self._failure: dict | None = None  # the first failure of the current streak
        self._lost = 0

    def append(self, row: dict) -> bool:
        """Queue `row` and write everything queued; False if the write failed (reported)."""
        self._pending.append(json.dumps(row) + "\n")
        if len(self._pending) > MAX_PENDING_ROWS:
            self._lost += len(self._pending) - MAX_PENDING_ROWS
            del self._pending[: len(self._pending) - MAX_PENDING_ROWS]
        return self._flush(row.get("step"))

    def _flush(self, step) -> bool:
        lines = list(self._pending)
        if self._failure is not None:
            event = {**self._failure, "rows_delayed": len(lines), "rows_lost": self._lost}
            lines.insert(0, json.dumps(event) + "\n")
        data = "".join(lines).encode()
        end = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            try:
                os.ftruncate(self._fd, end)  # back to the last whole line
            except OSError:
                pass
            if self._failure is None:
                self._failure = {
                    "event": "metrics_write_failed",
                    "step": step,
                    "error": os_error(e),
                    "free_bytes": free_bytes(self.path),
                }
                log.error(
                    "could not append to %s at step %s: %s; %s free on its filesystem; rows "
                    "are kept in memory and written when it works again",
                    self.path,
                    step,
                    self._failure["error"],
                    mib(self._failure["free_bytes"]),
                )
            return False
        if self._failure is not None:
            log.warning("%s is written again (%d rows were delayed)", self.path, len(lines) - 1)
        self._pending.clear()
        self._failure, self._lost = None, 0
        return True

    def close(self) -> None:
        if self._pending:
            self._flush(None)
        if self._pending:
            log.error("%s: %d rows could not be written", self.path, len(self._pending))
        os.close(self._fd)
