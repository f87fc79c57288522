"""Sharded, atomic, self-describing checkpoints under `run_dir/checkpoints/`.

    checkpoints/step_00000100/
        __0_0.distcp ...     model weights and optimizer moments, each rank its own shards
        .metadata            DCP's index: which bytes of which file hold which tensor slice
        state.json           step, tokens, data position, loss scaler, counters (rank 0)
        rng/rank_00000.json  each rank's torch (CPU and CUDA), numpy and python RNG states
        config.yaml          the resolved job config
        meta.json            format, step, mesh, size and checksum of every file above; last
    checkpoints/latest      name of the newest complete checkpoint (for scripts and people)

With `engine=deepspeed` the DCP files are replaced by DeepSpeed's own (`deepspeed/*.pt`, see
opt_train/engine/deepspeed.py); everything else, atomicity and verification included, is the
same. The object that writes the weights (`DCPWeights` here, `DeepSpeedWeights` there) names
the format in meta.json, and a checkpoint only loads into the engine that wrote it.

Model and optimizer go through torch.distributed.checkpoint (DCP): `get_state_dict` gives each
rank's FSDP/TP shards under canonical parameter names and DCP records where each slice belongs
in the full tensor, so a checkpoint loads on any mesh or world size (DCP reshards on load) and
no rank ever holds a full copy. The optimizer's param_groups (hyperparameters, all derived
from the config and the step) are not stored: the running job's groups are used, so every DCP
entry is a tensor and the only pickle in a checkpoint is DCP's own `.metadata` index.
The LR is not stored either: the schedule is a pure function of the step.

Visibility is atomic. Every rank writes into `.tmp-step_N/`; when DCP has finished on every
rank, each rank hashes the files it wrote, rank 0 gathers the hashes (this is also the
"everyone is done" barrier), writes `meta.json` last, renames the directory to `step_N` and
replaces `latest`. A kill at any instant leaves either no `step_N` or a complete one; a
`step_N` that fails verification (missing meta.json, missing file, wrong size or hash) is
reported and skipped in favour of the previous one.

Async saves (`checkpoint.async_save`) copy the state to CPU memory, then write, hash and rename
in background threads while training goes on. They use a gloo process group of their own: an
async save sharing the default group with training hangs or aborts ("Received data size doesn't
match expected size") because two threads then interleave collectives on one group.

A save that fails (disk full, EIO, a full quota, a permission change, on any rank) fails on
every rank: the ranks agree at each stage, rank 0 removes the partial `.tmp-step_N/`, logs one
line (which checkpoint, the directory, the OS error, the free space seen, the newest complete
checkpoint) and the outcome is queued for the `Checkpointing` callback, which writes a
`checkpoint_failed` event row and lets training go on; `checkpoint.max_failures` failures in a
row stop the run with `EXIT_CHECKPOINT_FAILED`. Pruning (`checkpoint.keep`) runs only after a
new checkpoint is complete, so it never removes the last complete one first.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import queue
import random
import re
import shutil
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from data_pipeline.files import fsync_path
from opt_train.config import CheckpointConfig
from opt_train.parallel.process_groups import DistInfo
from opt_train.train.run_files import free_bytes, mib, os_error
from opt_train.train.run_lock import holds_run_lock

log = logging.getLogger(__name__)

FORMAT = "opt-train-dcp/1"
KNOWN_FORMATS = (FORMAT, "opt-train-deepspeed/1")
STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


EXIT_CHECKPOINT_FAILED = 86  # "checkpoint.max_failures saves in a row failed": not requeued
# What a failed write raises: OSError, torch.save's RuntimeError ("unexpected pos", with the
# OSError as its __context__), and DCP's CheckpointException, which derives from
# BaseException, not Exception.
SAVE_ERRORS = (Exception, CheckpointException)


class CorruptCheckpoint(RuntimeError):
    """A checkpoint directory that is incomplete or whose bytes changed after it was written."""


class CheckpointSaveFailed(RuntimeError):
    """`checkpoint.max_failures` saves in a row failed; the run stops (EXIT_CHECKPOINT_FAILED)."""

    exit_code = EXIT_CHECKPOINT_FAILED


@dataclass
class SaveFailure:
    """One failed save, the same on every rank (the errors are gathered to rank 0)."""

    step: int
    directory: Path
    errors: str  # "rank 1: OSError [Errno 28] No space left on device; ..."
    free_bytes: int | None
    needed_bytes: int | None
    latest: str | None  # the newest complete checkpoint, if any
    in_a_row: int
    max_failures: int

    @property
    def gave_up(self) -> bool:
        return bool(self.max_failures) and self.in_a_row >= self.max_failures

    def line(self) -> str:
        need = f", the save needs about {mib(self.needed_bytes)}" if self.needed_bytes else ""
        then = (
            f"giving up: the run stops with status {EXIT_CHECKPOINT_FAILED}"
            if self.gave_up
            else "training goes on and the next interval tries again"
        )
        return (
            f"checkpoint step_{self.step:08d} failed ({self.in_a_row} in a row, "
            f"checkpoint.max_failures={self.max_failures}): writing {self.directory}: "
            f"{self.errors}; {mib(self.free_bytes)} free on its filesystem{need}; the partial "
            f"directory is removed; newest complete checkpoint: {self.latest or 'none'}; {then}"
        )

    def event(self) -> dict:
        """The fields of the `checkpoint_failed` row of metrics.jsonl."""
        return {
            "step": self.step,
            "checkpoint": f"step_{self.step:08d}",
            "dir": str(self.directory),
            "error": self.errors,
            "free_bytes": self.free_bytes,
            "needed_bytes": self.needed_bytes,
            "latest_complete": self.latest,
            "failures_in_a_row": self.in_a_row,
        }

    def give_up_message(self) -> str:
        return (
            f"{self.in_a_row} checkpoint saves in a row failed (checkpoint.max_failures="
            f"{self.max_failures}); the last, step_{self.step:08d} in {self.directory.parent}: "
            f"{self.errors} ({mib(self.free_bytes)} free). The newest complete checkpoint is "
            f"{self.latest or 'none'}: make room (or move run_dir), then re-run the same command "
            f"to resume from it. Exit status {EXIT_CHECKPOINT_FAILED} (launch scripts do not "
            "requeue it)."
        )


# -- files and hashes -----------------------------------------------------------------------


CHECKSUM = "xxh3_128"  # meta.json's per-file checksum; "sha256" in checkpoints before it


def _checksum(path: Path, algorithm: str = CHECKSUM) -> str:
    """A file's checksum. xxh3-128 runs at ~10 GB/s per core here against ~1.3 GB/s for sha256,
    which made hashing a large part of a save's time; it detects truncation and corruption as
    well (a cryptographic hash beside the data it covers would not stop tampering anyway).
    sha256 stays readable for checkpoints written before."""
    h = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a device or FIFO reads forever
            raise OSError(errno.EINVAL, f"{path}: not a regular file")
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _describe(root: Path, names: list[str], algorithm: str = CHECKSUM) -> dict[str, dict]:
    """Size and checksum of each file, hashed in parallel threads (both hashes release the
    GIL), as DCP writes `checkpoint.write_threads` files per rank."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        digests = list(pool.map(lambda n: _checksum(root / n, algorithm), names))
    return {
        n: {"bytes": (root / n).stat().st_size, algorithm: d}
        for n, d in zip(names, digests, strict=True)
    }


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


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
    _check_meta_types(meta_path, meta)
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
    for name, got in zip(mine, _describe(path, mine, algorithm).values(), strict=True):
        if got[algorithm] != files[name].get(algorithm):
            raise CorruptCheckpoint(f"{path / name}: {algorithm} checksum mismatch (corrupted)")
    if meta["format"] == FORMAT:
        read_dcp_metadata(path)
    return meta


# meta.json's fields and their types; a field of another type makes the checkpoint corrupt
# (skipped for the previous one), never a TypeError in whoever reads it later.
META_FIELDS = {"format": str, "step": int, "world": int, "files": dict}


def _check_meta_types(meta_path: Path, meta) -> None:
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


# -- what a checkpoint may make this process do ---------------------------------------------

# The globals DCP's `.metadata` pickle names (torch 2.13; every one a plain data holder) and
# nothing else: `pickle.load` would call any global a file names, so a `.metadata` rewritten
# by someone who can write the run_dir would run its code on resume and on export.
_DCP_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",  # read, to be refused by name below
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a name -> torch.layout lookup
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"names {module}.{name}, which a DCP index never holds")


def read_dcp_metadata(path: Path) -> Metadata:
    """DCP's `.metadata` index of checkpoint `path`, unpickled allowing only DCP's metadata
    classes, torch.Size, dtypes and plain containers, and refused (CorruptCheckpoint) unless
    every entry is a tensor stored as DCP writes it: DCP's default load planner
    `torch.load(weights_only=False)`s an entry declared as bytes, which this project never
    writes (the module docstring), and a transform or a path outside the checkpoint is not
    ours either."""
    f = path / ".metadata"
    try:
        with open(f, "rb") as fh:
            md = _DCPMetadataUnpickler(fh).load()
    except Exception as e:  # anything a damaged or hostile pickle raises while being refused
        raise CorruptCheckpoint(f"{f}: not a DCP index this project reads: {e}") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CorruptCheckpoint(f"{f}: not a DCP index (holds {type(md).__name__})")
    untrusted = sorted(
        k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)
    )
    if untrusted:
        shown = ", ".join(map(str, untrusted[:3])) + (" ..." if len(untrusted) > 3 else "")
        raise CorruptCheckpoint(
            f"{f}: declares {len(untrusted)} non-tensor entries ({shown}); this project "
            "writes only tensors, and DCP would unpickle those with code execution allowed"
        )
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or "/" in rel or rel in ("", ".", ".."):
            raise CorruptCheckpoint(f"{f}: a data file named {rel!r}, outside the checkpoint")
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpoint(
                f"{f}: {rel} declares transforms {info.transform_descriptors}, never written here"
            )
    return md


class TrustedReader(dcp.FileSystemReader):
    """DCP's reader with `.metadata` read by `read_dcp_metadata` instead of `pickle.load`
    (or handed in, already read that way)."""

    def __init__(self, path: Path, metadata: Metadata | None = None):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = self._metadata or read_dcp_metadata(Path(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default load planner, less its `torch.load(weights_only=False)` of bytes entries
    (TrustedReader already refuses an index that declares one; this holds if that changes)."""

    def load_bytes(self, read_item, value) -> None:
        raise CorruptCheckpoint(
            f"DCP entry {read_item.dest_index.fqn} is pickled bytes; only tensors are loaded"
        )


def load_dcp(state: dict, path: Path, group=None) -> None:
    """`dcp.load` of `state` from checkpoint `path`, running no code from its files: every
    DCP read in the project goes through here."""
    md = read_dcp_metadata(path)  # here, so its refusal is raised as itself: DCP rewraps a
    # reader's error; the reader is handed the index rather than unpickling it again
    dcp.load(
        state,
        storage_reader=TrustedReader(path, md),
        planner=TensorsOnlyPlanner(),
        process_group=group,
        no_dist=group is None,
    )


# -- RNG states as JSON ---------------------------------------------------------------------


def capture_rng() -> dict:
    """This process's RNG states, JSON-encodable (torch states as base64 bytes)."""

    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": b64(torch.get_rng_state()),
        "numpy": {
            "name": name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": _listify(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


def _listify(obj):
    return [_listify(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _tuplify(obj):
    return tuple(_tuplify(x) for x in obj) if isinstance(obj, list) else obj


# -- model and optimizer through DCP --------------------------------------------------------


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """{'model': ..., 'optim': {'state': ...}} of this rank's shards, and the live param_groups
    (kept out of the checkpoint; see the module docstring)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": {"state": optim_sd["state"]}}, optim_sd["param_groups"]


class _CheckpointFileSystem(FileSystem):
    """DCP's file system, changed in two ways for the files it writes.

    `torch.save` computes no zip CRC32 while a file is open for writing. DCP opens each file
    in the thread that writes it; the setting is per thread in torch 2.13, so it is made there
    and undone when the file is closed.

    Every error raised while a file is open for writing is kept in `errors`, on the rank and
    in the thread where it happened, with its causes intact. DCP cannot be relied on for them:
    it pickles each rank's exception to gather it, which drops `__context__`, so a full disk
    inside torch.save's zip writer (its OSError, then "unexpected pos" while it closes) reaches
    the ranks as the RuntimeError alone; and an error in one of its writer threads (all but
    the first of `thread_count`) is printed and dropped, so the save returns as if complete
    without that file's tensors. `DCPWeights.write` raises the first kept error instead."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[Exception] = []

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        before = torch.serialization.get_crc32_options()
        if "w" in mode:
            torch.serialization.set_crc32_options(False)
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except Exception as e:
            if "w" in mode:
                self.errors.append(e)  # list.append is atomic: DCP's threads share the list
            raise
        finally:
            torch.serialization.set_crc32_options(before)


class Weights(Protocol):
    """What writes and reads the model and optimizer part of a checkpoint for one engine."""

    format: str  # recorded in meta.json; a checkpoint loads only into the same format
    reshards: bool  # whether it loads at another world size or mesh

    def write(self, tmp: Path, group, asynchronous: bool) -> Future | None: ...

    def read(self, path: Path, group) -> None: ...

    def files_of_rank(self, root: Path, rank: int) -> list[str]: ...


def pinned_staging(model: torch.nn.Module) -> bool:
    """Whether async saves stage into pinned memory: when the weights are on a CUDA device
    (pinning needs the CUDA driver, and CPU weights are copied within host memory anyway)."""
    return any(p.device.type == "cuda" for p in model.parameters())


class DCPWeights:
    """Model weights and optimizer moments of the FSDP/TP engine, through DCP.

    Each rank writes its own shards (`__{rank}_{n}.distcp`) and DCP's `.metadata` records
    where every slice belongs in the full tensor, so these load on any mesh (`reshards`)."""

    format = FORMAT
    reshards = True

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, write_threads: int = 4
    ):
        self.model = model
        self.optimizer = optimizer
        self.write_threads = write_threads
        self._writer: dcp.FileSystemWriter | None = None

    def writer(self, tmp: Path) -> dcp.FileSystemWriter:
        """One DCP writer for every save of the run, pointed at `tmp` by DCP (`reset`).

        It is also the async saves' stager. With CUDA weights it keeps its CPU copy of the
        state between saves in pinned (page-locked) memory (`cache_staged_state_dict`):
        device-to-host copies into pinned memory run at the PCIe/NVLink-C2C rate, into
        pageable memory at a fraction of it, and pinning tens of GB anew for every save would
        cost more than the copy. The copy stays allocated for the run (the size of this rank's
        shards of weights and optimizer state). CPU runs stage into plain memory, as before."""
        if self._writer is None:
            self._writer = dcp.FileSystemWriter(
                tmp,
                thread_count=self.write_threads,
                cache_staged_state_dict=pinned_staging(self.model),
            )
            self._writer.fs = _CheckpointFileSystem()
        return self._writer

    def write(self, tmp: Path, group, asynchronous: bool) -> Future | None:
        """Write into `tmp`; asynchronously: stage (copy) the tensors into CPU memory now and
        return a future that completes when DCP's threads have written them.

        DCP stores each tensor as a `torch.save` zip record, whose CRC32 halved the write rate
        here (2.2 vs 4.4 GB/s into the page cache); the checkpoint's own checksums already
        cover every byte, so DCP's writer threads skip the CRC (`_CheckpointFileSystem`).

        A write that failed on this rank raises the error as it happened here, causes and all,
        in place of DCP's exception, and also when DCP returned as if all went well."""
        state, _ = _sharded_state(self.model, self.optimizer)
        writer = self.writer(tmp)
        fs = writer.fs
        fs.errors.clear()  # one save in flight at a time: CheckpointManager.save waits
        save = dcp.async_save if asynchronous else dcp.save
        out, error = None, None
        try:
            out = save(
                state,
                checkpoint_id=tmp,
                storage_writer=writer,
                process_group=group,
                no_dist=group is None,
            )
        except SAVE_ERRORS as e:
            error = e
        # Raised here, outside the handler: raising inside it would make DCP's exception the
        # kept error's __context__, in place of the OSError it holds.
        if fs.errors or error is not None:
            raise fs.errors[0] if fs.errors else error
        if not asynchronous:
            return None
        done: Future = Future()

        def settle(dcp_done: Future) -> None:
            try:
                result, failed = dcp_done.result(), None
            except BaseException as e:  # handed to whoever waits on the save
                result, failed = None, e
            if fs.errors or failed is not None:
                done.set_exception(fs.errors[0] if fs.errors else failed)
            else:
                done.set_result(result)

        out.add_done_callback(settle)
        return done

    def read(self, path: Path, group) -> None:
        """Load into the live model and optimizer, resharded to their current layout."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state, param_groups = _sharded_state(self.model, self.optimizer)
        load_dcp(state, path, group)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict={"state": state["optim"]["state"], "param_groups": param_groups},
        )

    @staticmethod
    def files_of_rank(root: Path, rank: int) -> list[str]:
        """The data files one rank wrote: DCP names them `__{rank}_{n}.distcp`."""
        return sorted(p.name for p in root.glob(f"__{rank}_*.distcp"))


class CheckpointManager:
    """Saves and restores whole-run state; one instance per run, created on every rank."""

    def __init__(
        self,
        directory: str | Path,
        cfg: CheckpointConfig,
        dist_info: DistInfo | None,
        timeout_s: float = 600.0,
    ):
        self.dir = Path(directory)
        self.cfg = cfg
        self.rank = dist_info.rank if dist_info else 0
        self.world = dist_info.world if dist_info else 1
        # Created once, collectively, on every rank: see the module docstring for why the
        # checkpoint traffic must not share the training group.
        self.group = None
        if self.world > 1:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._pending: Future | None = None
        self.last_saved_step = -1  # the newest step saved or being saved (not known failed)
        self._last_good_step = -1
        # Outcomes of finished saves, (step, SaveFailure | None), put by whichever thread
        # finished the save and read by the training thread in poll().
        self._outcomes: queue.SimpleQueue = queue.SimpleQueue()
        self.failures_in_a_row = 0
        self.last_failure: SaveFailure | None = None
        self._undelivered: list[SaveFailure] = []  # drained, not yet returned by poll()
        # Only the run itself clears its temporaries: a tool reading the run_dir (export,
        # eval) while the run saves would otherwise delete the save in flight.
        if self.rank == 0 and holds_run_lock(self.dir.parent):
            self._remove_leftovers()
        self._barrier()

    # -- saving ---------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    @property
    def gave_up(self) -> bool:
        """Whether `checkpoint.max_failures` saves in a row failed (as far as poll() saw)."""
        return self.last_failure is not None and self.last_failure.gave_up

    def save(
        self,
        step: int,
        weights: Weights,
        trainer_state: dict,
        config_yaml: str,
        blocking: bool = False,
    ) -> Path:
        """Start saving `step` (collective: every rank calls it). Returns the directory the
        checkpoint will have; it exists once `wait()` returns (at once if blocking) unless the
        save failed, which `poll()` then reports (a write error never raises here)."""
        self.wait()  # one save in flight at a time: the next waits for the previous
        self._drain()
        final = self.step_dir(step)
        if self.gave_up:  # known on every rank alike once the previous save has finished
            return final
        tmp = self.dir / f"{TMP_PREFIX}{final.name}"
        needed = self._check_space(final, weights) if self.rank == 0 else None
        self.last_saved_step = step
        error = None
        try:
            (tmp / "rng").mkdir(parents=True, exist_ok=True)
            _write_json(tmp / "rng" / f"rank_{self.rank:05d}.json", capture_rng())
            if self.rank == 0:
                _write_json(tmp / "state.json", trainer_state)
                (tmp / "config.yaml").write_text(config_yaml)
        except SAVE_ERRORS as e:
            error = e
        errors = self._agree(error)
        if errors:
            self._failed(step, tmp, errors, needed)
            return final
        meta = {
            "format": weights.format,
            "step": step,
            "world": self.world,
            "tokens": trainer_state.get("tokens"),
            "mesh": trainer_state.get("mesh"),
        }
        asynchronous = self.cfg.async_save and not blocking
        written = None
        try:
            written = weights.write(tmp, self.group, asynchronous)
        except SAVE_ERRORS as e:  # DCP gathers every rank's write result: all ranks get here
            error = e
        if asynchronous:
            # Our thread hashes and publishes once the write is done, so the training thread
            # never waits on disk.
            self._pending = self._in_background(
                self._finish, written, tmp, final, meta, weights, needed, error
            )
        else:
            self._finish(written, tmp, final, meta, weights, needed, error)
        return final

    def wait(self) -> None:
        """Block until the save in flight (if any) has finished, published or failed (see
        poll()); re-raise an error that is not a failed write (a dead peer, a bug)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def poll(self) -> list[SaveFailure]:
        """The saves that failed since the last call, without waiting for one in flight."""
        if self._pending is not None and self._pending.done():
            self.wait()
        self._drain()
        failed, self._undelivered = self._undelivered, []
        return failed

    def _drain(self) -> None:
        """Take in the outcomes of finished saves (training thread)."""
        while True:
            try:
                step, failure = self._outcomes.get_nowait()
            except queue.Empty:
                return
            if failure is None:
                self._last_good_step = step
                self.last_failure = None
            else:
                self._undelivered.append(failure)
                self.last_failure = failure
                if self.last_saved_step == step:
                    self.last_saved_step = self._last_good_step

    def close(self) -> None:
        """Wait for the save in flight (end of the run)."""
        self.wait()

    @staticmethod
    def _in_background(fn, *args) -> Future:
        """Run `fn` in a daemon thread. Daemon, so that a rank failing for another reason
        exits at once instead of waiting out a save whose peers are gone (that save stays
        invisible; the previous checkpoint is the one to resume from)."""
        done: Future = Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the save
                done.set_exception(e)

        threading.Thread(target=run, name="ckpt-finish", daemon=True).start()
        return done

    def _finish(
        self,
        written: Future | None,
        tmp: Path,
        final: Path,
        meta: dict,
        weights: Weights,
        needed: int | None,
        error: BaseException | None,
    ) -> Path | None:
        """Hash, gather, publish; every stage that can fail on one rank is followed by an
        exchange, so that all ranks reach the same collectives and the same outcome."""
        if error is None and written is not None:
            try:
                written.result()  # DCP's data files and .metadata are on disk on every rank
            except SAVE_ERRORS as e:
                error = e
        if error is None and self.cfg.debug_delay_s:
            time.sleep(self.cfg.debug_delay_s)  # test hook: a window to kill the job mid-save
        files: dict = {}
        if error is None:
            try:
                mine = [*weights.files_of_rank(tmp, self.rank), f"rng/rank_{self.rank:05d}.json"]
                files = _describe(tmp, mine)
            except SAVE_ERRORS as e:
                error = e
        # Returns on rank 0 once every rank has finished.
        everyone = self._gather(files if error is None else _error_text(self.rank, error))
        if self.rank == 0:
            # A rank that failed says so itself in the exchange below.
            if not any(isinstance(p, str) for p in everyone):
                try:
                    self._write_meta(tmp, meta, everyone)
                    self._publish(tmp, final)
                except SAVE_ERRORS as e:
                    error = e
        errors = self._agree(error)
        if errors:
            self._failed(meta["step"], tmp, errors, needed)
            return None
        if self.rank == 0:
            self._point_latest_and_prune(final)
        self.failures_in_a_row = 0
        self._outcomes.put((meta["step"], None))
        return final

    def _write_meta(self, tmp: Path, meta: dict, everyone: list) -> None:
        files = {k: v for part in everyone for k, v in part.items()}
        # Anything no rank claimed (DCP's .metadata, state.json, config.yaml, or a file named
        # in a way files_of_rank does not know) is hashed here.
        rest = sorted(
            str(p.relative_to(tmp))
            for p in tmp.rglob("*")
            if p.is_file() and str(p.relative_to(tmp)) not in files
        )
        files.update(_describe(tmp, rest))
        _write_json(tmp / "meta.json", {**meta, "files": files})

    def _failed(self, step: int, tmp: Path, errors: str, needed: int | None) -> None:
        """Every rank: record the failure; rank 0 removes the partial directory and says so."""
        free = free_bytes(self.dir)  # as the save saw it, before its files are removed
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.failures_in_a_row += 1
        done = self.complete_steps()
        failure = SaveFailure(
            step=step,
            directory=tmp,
            errors=errors,
            free_bytes=free,
            needed_bytes=needed,
            latest=self.step_dir(done[-1]).name if done else None,
            in_a_row=self.failures_in_a_row,
            max_failures=self.cfg.max_failures,
        )
        if self.rank == 0:
            log.error("%s", failure.line())
        self._outcomes.put((step, failure))

    def _check_space(self, final: Path, weights: Weights) -> int | None:
        """Rank 0, before writing: the bytes the save will need (the newest checkpoint's size,
        else about three fp32-sized copies of the weights: weights and two AdamW moments),
        with a warning now when the filesystem has less free. The save is still tried (room
        may be made meanwhile) and fails cleanly if it does not fit."""
        needed = None
        steps = self.complete_steps()
        if steps:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                meta = json.loads((self.step_dir(steps[-1]) / "meta.json").read_text())
                needed = sum(int(f["bytes"]) for f in meta["files"].values())
        model = getattr(weights, "model", None)
        if needed is None and isinstance(model, torch.nn.Module):
            local = sum(
                (p.to_local() if hasattr(p, "to_local") else p).numel() * 4
                for p in model.parameters()
            )
            needed = 3 * local * self.world
        free = free_bytes(self.dir)
        if needed is not None and free is not None and needed > free:
            log.warning(
                "checkpoint %s needs about %s but %s has %s free: it will not fit unless room "
                "is made; trying anyway (a failed save is cleaned up and training goes on)",
                final.name,
                mib(needed),
                self.dir,
                mib(free),
            )
        return needed

    def _publish(self, tmp: Path, final: Path) -> None:
        """Make `tmp` visible as `final` (rank 0). Up to the rename a failure leaves `tmp`
        for the caller to remove; nothing older has been touched yet."""
        for sub in (tmp, tmp / "rng"):
            fsync_path(sub)
        old = self.dir / f"{TMP_PREFIX}old-{final.name}"
        if final.exists():
            # A re-save of the same step (after a restart) replaces the old one; a kill
            # between the two renames leaves `old`, which the next start puts back.
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if old.exists():
                os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        fsync_path(self.dir)
        log.info("checkpoint %s saved", final)

    def _point_latest_and_prune(self, final: Path) -> None:
        """`latest` and pruning, once `final` is complete. `latest` is for people and scripts
        (resume scans the step directories), so a failure to update it is only a warning."""
        pointer = self.dir / f"{TMP_PREFIX}latest"
        try:
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.dir / "latest")
            fsync_path(self.dir)
        except OSError as e:
            pointer.unlink(missing_ok=True)
            log.warning("%s is complete, but %s could not be updated: %s", final, pointer, e)
        self._prune()

    def _prune(self) -> None:
        steps = self.complete_steps()
        recent = set(steps[-self.cfg.keep :])
        for step in steps:
            permanent = self.cfg.keep_every and step % self.cfg.keep_every == 0
            if step not in recent and not permanent:
                shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Temporary directories of saves that a kill interrupted; a complete checkpoint that a
        kill left renamed aside during a re-save of its step goes back in place."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                back = self.dir / p.name.removeprefix(f"{TMP_PREFIX}old-")
                if p.name.startswith(f"{TMP_PREFIX}old-") and not back.exists():
                    log.warning("restoring %s: a re-save of its step was interrupted", back)
                    os.rename(p, back)
                elif p.name.startswith(TMP_PREFIX):
                    log.warning("removing %s: an interrupted save", p)
                    if p.is_dir() and not p.is_symlink():  # a link is removed, not followed
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)

    # -- loading --------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps with a `step_N` directory (complete unless damaged afterwards), ascending."""
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := STEP_DIR.match(p.name)))

    def latest(self, before: int | None = None) -> Path | None:
        """The newest checkpoint (from before step `before`, if given) that verifies on every
        rank; damaged ones are reported (with the path and the reason) and skipped, so a
        spike rollback onto a tampered or torn checkpoint falls back like a resume does.
        Collective: all ranks walk rank 0's listing (another rank's may lag rank 0's rename)
        and return the same one."""
        steps = [s for s in self.complete_steps() if before is None or s < before]
        if self.group is not None:
            box = [steps]
            dist.broadcast_object_list(box, group_src=0, group=self.group)
            steps = box[0]
        for step in reversed(steps):
            path = self.step_dir(step)
            reason = ""
            try:
                verify(path, self.rank, self.world)
            except CorruptCheckpoint as e:
                reason = str(e)
            if self._any(bool(reason)):
                if reason:
                    log.warning("skipping damaged checkpoint %s: %s", path, reason)
                continue
            return path
        return None

    def load(self, path: Path, weights: Weights, mesh: dict | None = None) -> dict:
        """Restore model and optimizer (resharded to this job's mesh, where the format allows)
        and, when this job has the world size and `mesh` that saved, this rank's RNG states;
        returns the trainer state. On another layout rank r is not the same shard of the work,
        so its saved RNG stream would not continue anything: the freshly seeded streams are
        kept."""
        meta = json.loads((path / "meta.json").read_text())
        if meta["format"] != weights.format:
            raise ValueError(
                f"{path} holds {meta['format']} weights, but this run's engine reads "
                f"{weights.format}: resume with the engine that wrote it, or start a new run_dir"
            )
        if not weights.reshards and meta["world"] != self.world:
            raise ValueError(
                f"{path} was saved by {meta['world']} ranks and {weights.format} checkpoints "
                f"load only at the same world size; this run has {self.world}"
            )
        weights.read(path, self.group)
        trainer_state = json.loads((path / "state.json").read_text())
        rng_file = path / "rng" / f"rank_{self.rank:05d}.json"
        if meta["world"] == self.world and meta.get("mesh") == mesh:
            restore_rng(json.loads(rng_file.read_text()))
        else:
            log.warning(
                "%s was saved by %d ranks with mesh %s; this run has %d ranks with mesh %s: "
                "weights, optimizer and data position are resharded, RNG streams start fresh",
                path,
                meta["world"],
                meta.get("mesh"),
                self.world,
                mesh,
            )
        return trainer_state

    # -- collectives on the checkpoint group ----------------------------------------------

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _gather(self, obj) -> list:
        if self.group is None:
            return [obj]
        out: list | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out or []

    def _agree(self, error: BaseException | None) -> str:
        """Every rank's error (if any) to every rank: '' when all succeeded, else one line
        naming each failed rank and its OS error. A rank that failed only because DCP told it
        another rank had is left out of the line when a rank with its own error is in it.
        Collective."""
        mine = ("", False)
        if error is not None:
            failures = getattr(error, "failures", None)  # DCP's: the ranks that failed
            relayed = isinstance(failures, dict) and self.rank not in failures
            mine = (_error_text(self.rank, error), not relayed)
        if self.group is None:
            return mine[0]
        out: list = [None] * self.world
        dist.all_gather_object(out, mine, group=self.group)
        own = [text for text, of_its_own in out if text and of_its_own]
        return "; ".join(own or [text for text, _ in out if text])

    def _any(self, flag: bool) -> bool:
        if self.group is None:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())


def _error_text(rank: int, error: BaseException) -> str:
    return f"rank {rank}: {os_error(error)}"


# -- export ---------------------------------------------------------------------------------


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
            ckpt = d / f"step_{step:08d}"
            try:
                verify(ckpt)
            except CorruptCheckpoint as e:
                log.warning("skipping damaged checkpoint %s: %s", ckpt, e)
                continue
            return ckpt
    raise FileNotFoundError(f"{path}: no complete checkpoint found")


def _children(d: Path) -> list[Path]:
    return list(d.iterdir()) if d.is_dir() else []
