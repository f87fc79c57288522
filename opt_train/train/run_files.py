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
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MAX_PENDING_ROWS = 100_000  # rows held while metrics.jsonl cannot be written; older ones go


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for unprivileged users) on the filesystem holding `path`, or None."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:.1f} MiB"


def os_error(e: BaseException) -> str:
    """The OS error behind `e` (followed through causes and DCP's per-rank failures), as
    `OSError [Errno 28] No space left on device`; else the exception itself."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return f"OSError [Errno {x.errno}] {os.strerror(x.errno)}"
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)  # torch.distributed.checkpoint's exception
        if isinstance(failures, dict):
            for f in failures.values():  # an exception, or (exception, traceback)
                todo += [
                    x for x in (f if isinstance(f, tuple) else (f,)) if isinstance(x, BaseException)
                ]
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:300]}"


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
    """Replace `path` with `text` (a temporary file, fsync, rename): a failure leaves the old
    file whole. Returns the error, already reported, or None."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return None
    except OSError as e:
        tmp.unlink(missing_ok=True)
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
