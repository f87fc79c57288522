"""Saving, keeping and finding whole-run checkpoints under `run_dir/checkpoints/` (the files
are in `opt_train.checkpoint.layout`).

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

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.files import (
    atomic_write,
    atomic_write_json,
    free_bytes,
    mib,
    os_error,
    publish_dir,
)
from opt_train.checkpoint.layout import (
    STEP_DIR,
    TMP_PREFIX,
    CorruptCheckpoint,
    describe,
    step_name,
    verify,
)
from opt_train.checkpoint.weights import SAVE_ERRORS, Weights, capture_rng, restore_rng
from opt_train.config import CheckpointConfig
from opt_train.parallel.process_groups import DistInfo, any_rank, each_rank

log = logging.getLogger(__name__)

# `latest`'s temporary while atomic_write replaces it (data_pipeline.files.temporary_beside).
_LATEST_TMP = ".latest.tmp-"

EXIT_CHECKPOINT_FAILED = 86  # "checkpoint.max_failures saves in a row failed": not requeued


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
            f"checkpoint {step_name(self.step)} failed ({self.in_a_row} in a row, "
            f"checkpoint.max_failures={self.max_failures}): writing {self.directory}: "
            f"{self.errors}; {mib(self.free_bytes)} free on its filesystem{need}; the partial "
            f"directory is removed; newest complete checkpoint: {self.latest or 'none'}; {then}"
        )

    def event(self) -> dict:
        """The fields of the `checkpoint_failed` row of metrics.jsonl."""
        return {
            "step": self.step,
            "checkpoint": step_name(self.step),
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
            f"{self.max_failures}); the last, {step_name(self.step)} in {self.directory.parent}: "
            f"{self.errors} ({mib(self.free_bytes)} free). The newest complete checkpoint is "
            f"{self.latest or 'none'}: make room (or move run_dir), then re-run the same command "
            f"to resume from it. Exit status {EXIT_CHECKPOINT_FAILED} (launch scripts do not "
            "requeue it)."
        )


class CheckpointManager:
    """Saves and restores whole-run state; one instance per run, created on every rank."""

    def __init__(
        self,
        directory: str | Path,
        cfg: CheckpointConfig,
        dist_info: DistInfo | None,
        timeout_s: float = 600.0,
        run_lock_held: bool = False,
    ):
        """`run_lock_held`: whether this process holds the run_dir's lock (the trainer asks
        `opt_train.train.run_lock.holds_run_lock`). Only the run itself clears the temporaries
        of interrupted saves: a tool reading the run_dir (export, eval) while the run saves
        would otherwise delete the save in flight."""
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
        if self.rank == 0 and run_lock_held:
            self._remove_leftovers()
        self._barrier()

    # -- saving ---------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        return self.dir / step_name(step)

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
            atomic_write_json(tmp / "rng" / f"rank_{self.rank:05d}.json", capture_rng())
            if self.rank == 0:
                atomic_write_json(tmp / "state.json", trainer_state)
                atomic_write(tmp / "config.yaml", config_yaml)
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

    def _wait_for_gate(self, name: str) -> TimeoutError | None:
        """Test hook (`checkpoint.debug_gate`): hold the save, shards written but not visible,
        until the test creates `<debug_gate>/<name>`; bounded, so a test that never releases
        it fails that save instead of hanging the run."""
        gate = Path(self.cfg.debug_gate) / name
        deadline = time.monotonic() + self.cfg.debug_gate_timeout_s
        while not gate.exists():
            if time.monotonic() > deadline:
                return TimeoutError(f"checkpoint.debug_gate: {gate} not created within "
                                    f"{self.cfg.debug_gate_timeout_s:g} s")  # fmt: skip
            time.sleep(0.05)
        return None

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
        if error is None and self.cfg.debug_gate:
            error = self._wait_for_gate(final.name)
        files: dict = {}
        if error is None:
            try:
                mine = [*weights.files_of_rank(tmp, self.rank), f"rng/rank_{self.rank:05d}.json"]
                files = describe(tmp, mine)
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
        files.update(describe(tmp, rest))
        atomic_write_json(tmp / "meta.json", {**meta, "files": files})

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
        for the caller to remove; nothing older has been touched yet. A re-save of the same
        step (after a restart) parks the old one as `.tmp-old-step_N`: a kill between the
        two renames leaves it there, and the next start puts it back."""
        publish_dir(tmp, final, old=self.dir / f"{TMP_PREFIX}old-{final.name}")
        log.info("checkpoint %s saved", final)

    def _point_latest_and_prune(self, final: Path) -> None:
        """`latest` and pruning, once `final` is complete. `latest` is for people and scripts
        (resume scans the step directories), so a failure to update it is only a warning."""
        pointer = self.dir / "latest"
        try:
            atomic_write(pointer, final.name + "\n")
        except OSError as e:
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
                elif p.name.startswith((TMP_PREFIX, _LATEST_TMP)):
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
        out = [mine] if self.group is None else each_rank(mine, self.group)
        own = [text for text, of_its_own in out if text and of_its_own]
        return "; ".join(own or [text for text, _ in out if text])

    def _any(self, flag: bool) -> bool:
        return flag if self.group is None else any_rank(flag, group=self.group)


def _error_text(rank: int, error: BaseException) -> str:
    return f"rank {rank}: {os_error(error)}"
