"""A checkpoint on disk: its directory names, formats, checksums and `meta.json`, and the check
(`verify`) that a directory is complete and unchanged before anything reads it.

    checkpoints/step_00000100/
        __0_0.distcp ...     model weights and optimizer moments, each rank its own shards
        .metadata            DCP's index: which bytes of which file hold which tensor slice
        state.json           step, tokens, data position, loss scaler, counters (rank 0)
        rng/rank_00000.json  each rank's torch (CPU and CUDA), numpy and python RNG states
        config.yaml          the resolved job config
        meta.json            format, step, mesh, size and checksum of every file above; last
    checkpoints/latest      name of the newest complete checkpoint (for scripts and people)
    checkpoints/.tmp-*      a save in flight, or one a kill interrupted (never read)

With `engine=deepspeed` the DCP files are replaced by DeepSpeed's own (`deepspeed/*.pt`, see
opt_train/engine/deepspeed.py); everything else, verification included, is the same. The
object that writes the weights names the format in meta.json, and a checkpoint only loads into
the engine that wrote it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from opt_train.checkpoint.trusted import CorruptCheckpoint, read_dcp_metadata

log = logging.getLogger(__name__)

FORMAT = "opt-train-dcp/1"
KNOWN_FORMATS = (FORMAT, "opt-train-deepspeed/1")
STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


CHECKSUM = "xxh3_128"  # meta.json's per-file checksum; older checkpoints record "sha256"


def _checksum(path: Path, algorithm: str = CHECKSUM) -> str:
    """A file's checksum. xxh3-128 hashes several times faster than sha256, which made hashing
    a large part of a save's time (rates and the command: docs/benchmarks.md, "Checksum and
    CRC32 rates"); it detects truncation and corruption as well (a cryptographic hash beside
    the data it covers would not stop tampering anyway). sha256 stays readable: checkpoints
    that record it still verify."""
    h = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a device or FIFO reads forever
            raise OSError(errno.EINVAL, f"{path}: not a regular file")
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def describe(root: Path, names: list[str], algorithm: str = CHECKSUM) -> dict[str, dict]:
    """Size and checksum of each file, hashed in parallel threads (both hashes release the
    GIL), as DCP writes `checkpoint.write_threads` files per rank."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        digests = list(pool.map(lambda n: _checksum(root / n, algorithm), names))
    return {
        n: {"bytes": (root / n).stat().st_size, algorithm: d}
        for n, d in zip(names, digests, strict=True)
    }


def verify(path: Path, rank: int = 0, world: int = 1) -> dict:
    """Check a checkpoint directory; returns its meta.json. Every rank checks that all files
    exist with their recorded sizes and hashes its 1/world share of them, so verifying a large
    sharded checkpoint costs one read of it spread over the ranks. A DCP checkpoint's
    `.metadata` is also read, with `read_dcp_metadata`'s restricted unpickler: a checksum only
    says the bytes did not change since meta.json was written, and anyone who can write the
    run_dir can rewrite both."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CorruptCheckpoint(f"{path}: no meta.json (the save did not finish)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{meta_path}: unreadable ({e})") from None
    check_meta_types(meta_path, meta)
    files = meta["files"]
    names = sorted(files)
    for name in names:
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f}: missing")
        if f.stat().st_size != files[name]["bytes"]:
            raise CorruptCheckpoint(
                f"{f}: {f.stat().st_size} bytes, meta.json says {files[name]['bytes']} (truncated?)"
            )
    mine = names[rank::world]
    algorithm = CHECKSUM if all(CHECKSUM in files[n] for n in names) else "sha256"
    for name, got in zip(mine, describe(path, mine, algorithm).values(), strict=True):
        if got[algorithm] != files[name].get(algorithm):
            raise CorruptCheckpoint(f"{path / name}: {algorithm} checksum mismatch (corrupted)")
    if meta["format"] == FORMAT:
        read_dcp_metadata(path)
    return meta


# meta.json's fields and their types; a field of another type makes the checkpoint corrupt
# (skipped for the previous one), never a TypeError in whoever reads it later.
META_FIELDS = {"format": str, "step": int, "world": int, "files": dict}


def check_meta_types(meta_path: Path, meta) -> None:
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(f"{meta_path}: not a JSON object")
    for key, kind in META_FIELDS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CorruptCheckpoint(
                f"{meta_path}: {key!r} is {value!r}, expected {kind.__name__} (damaged)"
            )
    if meta["format"] not in KNOWN_FORMATS:
        raise CorruptCheckpoint(
            f"{meta_path.parent}: format {meta['format']!r}, expected one of {KNOWN_FORMATS}"
        )
    if meta.get("mesh") is not None and not isinstance(meta["mesh"], dict):
        raise CorruptCheckpoint(f"{meta_path}: 'mesh' is {meta['mesh']!r}, expected an object")
    for name, entry in meta["files"].items():
        parts = Path(name).parts
        # Names are relative paths inside the checkpoint: nothing outside it is read.
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise CorruptCheckpoint(f"{meta_path}: file name {name!r} is outside the checkpoint")
        size = entry.get("bytes") if isinstance(entry, dict) else None
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or not any(isinstance(entry.get(a), str) for a in (CHECKSUM, "sha256"))
        ):
            raise CorruptCheckpoint(
                f"{meta_path}: files[{name!r}] is {entry!r}, expected "
                f'{{"bytes": int, "{CHECKSUM}": str}} (damaged)'
            )


def find_checkpoint(path: str | Path) -> Path:
    """A run_dir, a checkpoints/ dir or one checkpoint dir -> the checkpoint dir to read,
    verified (a named checkpoint that fails verification raises CorruptCheckpoint; in a
    run_dir damaged ones are reported and skipped, as on resume). Reads only: nothing in the
    run_dir is created, changed or removed (a live run's save in flight stays as it is)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        verify(p)
        return p
    for d in (p, p / "checkpoints"):
        steps = sorted(
            (int(m.group(1)) for c in _children(d) if (m := STEP_DIR.match(c.name))),
            reverse=True,
        )
        for step in steps:
            ckpt = d / step_name(step)
            try:
                verify(ckpt)
            except CorruptCheckpoint as e:
                log.warning("skipping damaged checkpoint %s: %s", ckpt, e)
                continue
            return ckpt
    raise FileNotFoundError(f"{path}: no complete checkpoint found")


def _children(d: Path) -> list[Path]:
    return list(d.iterdir()) if d.is_dir() else []
