"""The model-and-optimizer part of a checkpoint (`Weights`; `DCPWeights` for the FSDP/TP engine)
and each rank's RNG states.

Model and optimizer go through torch.distributed.checkpoint (DCP): `get_state_dict` gives each
rank's FSDP/TP shards under canonical parameter names and DCP records where each slice belongs
in the full tensor, so a checkpoint loads on any mesh or world size (DCP reshards on load) and
no rank ever holds a full copy. The optimizer's param_groups (hyperparameters, all derived
from the config and the step) are not stored: the running job's groups are used, so every DCP
entry is a tensor and the only pickle in a checkpoint is DCP's own `.metadata` index.
The LR is not stored either: the schedule is a pure function of the step.
"""

from __future__ import annotations

import base64
import contextlib
import random
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from opt_train.checkpoint.layout import FORMAT
from opt_train.checkpoint.trusted import load_dcp

# What a failed write raises: OSError, torch.save's RuntimeError ("unexpected pos", with the
# OSError as its __context__), and DCP's CheckpointException, which derives from
# BaseException, not Exception.
SAVE_ERRORS = (Exception, CheckpointException)


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
        shards of weights and optimizer state). CPU runs stage into plain memory."""
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

        DCP stores each tensor as a `torch.save` zip record, whose CRC32 halves the write rate
        into the page cache (docs/benchmarks.md, "Checksum and CRC32 rates"); the checkpoint's
        own checksums already cover every byte, so DCP's writer threads skip the CRC
        (`_CheckpointFileSystem`).

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
