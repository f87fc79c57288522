"""What the pipeline may delete or replace: only what it provably wrote.

One typo in `output=` or `work_dir=` must never cost a user a dataset, so every removal and
every replacement of an existing path goes through this module:

- A stage's scratch is a private directory (`work_dir/opt-train-<stage>.work`, or beside the
  output when `work_dir` is unset) that holds `WORK_MARKER`, written when the stage created it.
  `remove_work` removes such a directory and nothing else; `claim_work` refuses an existing one
  without the marker.
- An existing output is replaced only when it carries one of the project's marks
  (`check_output`): a token shard set's manifest.json in the project's format, a stage report
  (`<output>.report.json`, written before a stage publishes its output) or chain stage record
  (`<output>.stage.json`) beside it. Nothing is added inside an output: a part directory holds
  only its parts. An empty directory holds nothing to lose and is replaced
  too. Anything else is refused with `NotOursError`, before anything is touched.
- `rmtree` never follows a symbolic link: a link inside a removed directory is unlinked, and a
  link given as the path itself is refused (its target is not ours to judge).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from data_pipeline.files import atomic_write

WORK_MARKER = ".opt-train-work"  # inside a stage's private scratch directory
# A token-shard directory's mark: its manifest and the format named in it (data_pipeline.shards
# writes them; defined here, below shards, so recognising one needs no import of shards).
SHARD_MANIFEST = "manifest.json"
SHARD_FORMAT = "opt-train-token-shards"


class Refused(Exception):
    """A run refused before touching anything; its message is the one line a user needs."""


class NotOursError(Refused, ValueError):
    """A path the pipeline would delete or replace that it did not write; nothing was touched."""


class StageBusyError(Refused, RuntimeError):
    """Another run holds the lock of this stage's work directory."""


def describe(path: Path) -> str:
    """What is at `path`, for a refusal: `a file of 12 bytes`, `3 entries: a/, b/, notes.txt`."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link to {os.readlink(path)}"
    if not stat.S_ISDIR(st.st_mode):
        return f"a file of {st.st_size:,} bytes"
    names = sorted(
        e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in os.scandir(path)
    )
    shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"


def _json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_our_output(path: Path) -> bool:
    """Whether an existing `path` carries a mark the project leaves on what it publishes."""
    if path.is_symlink():
        return False
    beside = [path.with_name(path.name + s) for s in (".report.json", ".stage.json")]
    if any((rec := _json(p)) is not None and "stage" in rec for p in beside):
        return True
    if path.is_dir():
        manifest = _json(path / SHARD_MANIFEST)
        if manifest is not None and manifest.get("format") == SHARD_FORMAT:
            return True
        return not any(os.scandir(path))  # empty: nothing in it to lose
    return False


def check_output(
    path: str | Path,
    key: str = "output",
    is_ours: Callable[[Path], bool] | None = None,
    what: str = "opt-train output",
) -> None:
    """Refuse (NotOursError, one line naming `key`, the path and what is there) to replace an
    existing `path` that the project did not write; a missing path is fine. `is_ours` says
    what counts as ours (default: a pipeline output, `is_our_output`); `what` names it."""
    path = Path(path)
    if not os.path.lexists(path) or (is_ours or is_our_output)(path):
        return
    raise NotOursError(
        f"{key}={path} exists and is not an {what} (holds {describe(path)}); "
        "choose another path or remove it yourself"
    )


def rmtree(path: Path) -> None:
    """Remove a directory tree the caller has shown to be ours, or a file; symbolic links
    inside are unlinked, never followed. A missing path is fine."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # unlinks the symbolic links it meets; never descends into them
    else:
        path.unlink(missing_ok=True)


def work_dir(parent: str | None, stage: str, default: Path) -> Path:
    """A stage's private scratch directory: `<parent>/opt-train-<stage>.work` when the user
    gave `work_dir=parent`, else `default` (a name beside the output that only we use)."""
    return Path(parent) / f"opt-train-{stage}.work" if parent else default


def claim_work(work: Path, stage: str) -> None:
    """Create the private scratch directory with its marker, or check that an existing one is
    ours (an empty one is adopted). Refuses anything else, touching nothing."""
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise NotOursError(
            f"work directory {work} exists and is not one opt-train made (holds "
            f"{describe(work)}); choose another work_dir or remove it yourself"
        )
    if work.is_dir() and not (work / WORK_MARKER).is_file() and any(os.scandir(work)):
        raise NotOursError(
            f"work directory {work} exists and is not one opt-train made (holds "
            f"{describe(work)}, no {WORK_MARKER}); choose another work_dir or remove it yourself"
        )
    work.mkdir(parents=True, exist_ok=True)
    marker = work / WORK_MARKER
    if not marker.is_file():
        atomic_write(marker, json.dumps({"stage": stage}) + "\n")


def remove_work(work: Path) -> None:
    """Remove a stage's private scratch directory, only if it holds the marker."""
    if work.is_symlink() or not (work / WORK_MARKER).is_file():
        return
    rmtree(work)
