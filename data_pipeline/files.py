"""Durable file operations: the one place that writes a file or publishes a directory so that a
crash leaves the old version or the new one, never half of either.

Shards, checkpoints, stage records, reports, tokenizer records, HF exports and the run's own
files all write through these. Whether an existing path may be replaced at all is
`data_pipeline.ownership`'s question, asked by the caller before it publishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_beside(path: Path, tag: str = "tmp") -> Path:
    """A name beside `path` that only this process uses (`.name.tmp-<pid>`): a killed writer's
    leftover is recognisable by its prefix and never collides with a live writer's."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def publish_file(tmp: Path, path: Path) -> None:
    """Make the complete file `tmp` (a temporary beside `path`, see `temporary_beside`) visible
    as `path`: fsynced, renamed over it, and the directory fsynced, so after a crash `path`
    holds the old bytes or the new ones. For writers that stream into the temporary."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` (`publish_file` of a temporary holding it). A failure removes
    the temporary and raises."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        publish_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """`atomic_write` of `obj` as JSON (sorted keys; values JSON does not know as strings)."""
    text = json.dumps(obj, indent=indent, sort_keys=True, default=str)
    atomic_write(path, text + "\n")


def publish_dir(tmp: Path, final: Path, old: Path | None = None, sync_files: bool = False) -> None:
    """Make the complete directory `tmp` visible as `final` by rename. An existing `final`
    (which the caller has checked may be replaced) is first renamed to `old` (default: a
    temporary beside it), then removed once `tmp` is in place; a rename that fails puts it
    back. Links inside the old directory are unlinked, never followed. `sync_files`: fsync
    the files directly inside `tmp` first, for writers that did not sync their own (a reader
    after a crash must not find the name with unwritten bytes behind it)."""
    if sync_files:
        for f in tmp.iterdir():
            if f.is_file() and not f.is_symlink():
                fsync_path(f)
    fsync_path(tmp)
    old = old or temporary_beside(final, "old")
    parked = False
    if os.path.lexists(final):
        os.rename(final, old)  # renames a link itself, never its target
        parked = True
    try:
        os.rename(tmp, final)
    except OSError:
        if parked:
            os.rename(old, final)
        raise
    fsync_path(final.parent)
    if parked:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)  # unlinks the symbolic links it meets; never descends into them
        else:
            old.unlink(missing_ok=True)


# -- what a failed write reports ------------------------------------------------------------


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
    """The OS error behind `e` (followed through causes and the per-rank `failures` of
    torch.distributed.checkpoint's exception), as `OSError [Errno 28] No space left on
    device`; else the exception itself."""
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
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():  # an exception, or (exception, traceback)
                todo += [
                    x for x in (f if isinstance(f, tuple) else (f,)) if isinstance(x, BaseException)
                ]
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:300]}"
