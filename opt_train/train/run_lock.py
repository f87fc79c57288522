"""One run per run_dir: rank 0 holds `run_dir/run.lock` for the whole run.

The lock is the kernel's `flock` on that file, taken without waiting; the file's content is the
holder's record (host, pid, Slurm job id and restart, torchrun restart, start time), which a
refused start prints. The kernel drops the lock when the holder dies however it dies (SIGKILL,
OOM), so a dead holder never blocks a restart: the next start finds the lock free and the old
record still there, takes over and says whose lock it was. A clean end empties the record.

Why `fcntl.flock` and not the `filelock` package: the holder's record must live in the locked
file and be readable by whoever is refused, and a restart after SIGKILL must never need a
manual step. `filelock` (4.x) falls back to a soft lock file where `flock` is missing, and a
soft lock outlives a SIGKILLed holder, which is the manual step this avoids.

Traps:
- On NFS the Linux client turns `flock` into a whole-file POSIX lock, and a POSIX lock is
  dropped when its process closes *any* descriptor of the file. So the holding process never
  opens run.lock a second time: a second `RunLock` in the same process reuses the held one.
- A dead node's lock on NFSv4 lingers until the server's lease runs out (90 s by default); on
  NFSv3 (NLM) until the node boots again. A Slurm requeue of the same job, or a torchrun restart
  on the same agent, then finds the lock held by an earlier attempt of itself. That holder is
  dead by construction (Slurm requeues only an ended job; torchrun restarts only a stopped
  group), so the new attempt takes over at once and keeps trying to take the kernel lock in the
  background until the lingering one expires.
- Where `flock` is not supported at all (Lustre mounted without `-o flock`), the lock cannot
  work: the run says so in a warning and goes on, refusing only a holder it can see alive on
  this host (docs/fault-tolerance.md).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
EXIT_RUN_DIR_LOCKED = 87  # "another run holds this run_dir"; launch scripts must not requeue
RETRY_S = 5.0  # how often an attempt that took over a lingering lock tries the kernel lock
_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}

_held: dict[str, RunLock] = {}  # realpath -> the lock this process holds


class RunDirLocked(RuntimeError):
    """Another live run holds this run_dir."""

    exit_code = EXIT_RUN_DIR_LOCKED


def holder_record() -> dict:
    """Who this process is, as the lock file records it."""
    env = os.environ
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "agent_pid": os.getppid() if "TORCHELASTIC_RESTART_COUNT" in env else None,
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT", "0")),
        "torchrun_restart_count": int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def describe(rec: dict) -> str:
    if not rec:
        return "a run that has not written its record yet"
    job = f", Slurm job {rec['slurm_job_id']}" if rec.get("slurm_job_id") else ""
    return f"pid {rec.get('pid')} on {rec.get('host')}{job}, started {rec.get('started')}"


def _alive_here(rec: dict) -> bool:
    """Whether the recorded holder is a live process on this host (False when unknown)."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    try:
        os.kill(rec["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _earlier_attempt_of_this_job(rec: dict, me: dict) -> str | None:
    """Why the holder is a dead earlier attempt of this same job, or None."""
    if me["slurm_job_id"] and rec.get("slurm_job_id") == me["slurm_job_id"]:
        if rec.get("slurm_restart_count", 0) < me["slurm_restart_count"]:
            return f"Slurm requeued job {me['slurm_job_id']} (restart {me['slurm_restart_count']})"
    same_agent = me["agent_pid"] is not None and (rec.get("host"), rec.get("agent_pid")) == (
        me["host"],
        me["agent_pid"],
    )
    if same_agent and rec.get("torchrun_restart_count", 0) < me["torchrun_restart_count"]:
        return f"torchrun restarted its workers (restart {me['torchrun_restart_count']})"
    return None


class RunLock:
    """The lock on one run_dir, held by this process until `release()` or exit."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self.locked = False  # whether the kernel lock is held (False: taken over, see above)
        self.took_over: dict | None = None  # the record of the holder this run replaced
        self._guard = threading.Lock()  # the retry thread never touches a closed descriptor
        self._supported = True  # whether this filesystem has flock at all

    def acquire(self) -> RunLock:
        key = os.path.realpath(self.path)
        if key in _held:  # this process already holds it (see the NFS trap above)
            return _held[key]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        me = holder_record()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.locked = True
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    self._held_elsewhere(fd, me)
                elif e.errno in _UNSUPPORTED:
                    self._unsupported(fd, me, e)
                else:
                    raise
            previous = _read(fd)
            if previous and self.locked and self.took_over is None:
                self.took_over = previous
                log.warning(
                    "%s: taking over the lock of %s, which ended without releasing it "
                    "(killed, or its node died)",
                    self.path,
                    describe(previous),
                )
            _write(fd, me)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _held[key] = self
        if not self.locked and self._supported:
            threading.Thread(target=self._keep_trying, name="run-lock", daemon=True).start()
        return self

    def _held_elsewhere(self, fd: int, me: dict) -> None:
        rec = _read(fd)
        why = _earlier_attempt_of_this_job(rec, me)
        if why is None or _alive_here(rec):
            raise RunDirLocked(
                f"{self.path.parent} is in use by another run ({describe(rec)}; lock file "
                f"{self.path}). Two runs on one run_dir would write the same metrics and "
                "checkpoints. Wait for it to end or stop it, or use another run_dir."
            )
        self.took_over = rec
        log.warning(
            "%s: %s; the lock of the attempt before (%s) is still held by the filesystem (a "
            "dead node's lock outlives it on NFS until its lease ends): taking over",
            self.path,
            why,
            describe(rec),
        )

    def _unsupported(self, fd: int, me: dict, e: OSError) -> None:
        self._supported = False
        rec = _read(fd)
        if rec and _alive_here(rec):
            raise RunDirLocked(f"{self.path.parent} is in use by another run ({describe(rec)})")
        log.warning(
            "%s: this filesystem does not support flock (%s): a second run on this run_dir "
            "will not be refused (on Lustre mount with -o flock; docs/fault-tolerance.md)",
            self.path,
            os.strerror(e.errno),
        )

    def _keep_trying(self) -> None:
        while True:
            with self._guard:
                if self._fd is None:
                    return
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self.locked = True
                    log.warning("%s: the lingering lock expired; this run holds it now", self.path)
                    return
                except OSError:
                    pass
            time.sleep(RETRY_S)

    def release(self) -> None:
        """Empty the record and drop the lock (a clean end: the next start takes it silently)."""
        with self._guard:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
        _held.pop(os.path.realpath(self.path), None)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the next start then reports a takeover, which is harmless
        finally:
            os.close(fd)  # closing drops the flock


def holds_run_lock(run_dir: str | Path) -> bool:
    """Whether this process holds `run_dir`'s lock (taken over counts: see `RunLock`). The
    trainer tells its checkpoint manager this: only the run itself may remove the run's
    temporaries, never a tool that reads the run_dir while the run is writing it."""
    return os.path.realpath(Path(run_dir) / LOCK_NAME) in _held


def release_run_locks() -> None:
    """Release every run lock this process holds (the end of `train`, however it ends)."""
    for lock in list(_held.values()):
        lock.release()


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _write(fd: int, rec: dict) -> None:
    """The record, replacing the old one; a failure (disk full) leaves the lock held."""
    data = (json.dumps(rec) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError as e:
        log.warning("could not write the run lock's record: %s", e)


def hold_run_lock(run_dir: Path, dist_info) -> RunLock | None:
    """Rank 0 takes the lock; then every rank raises RunDirLocked if it could not (one
    all-reduce on the default group), so a refused start ends within seconds on all ranks."""
    from opt_train.parallel.process_groups import any_rank

    lock, error = None, None
    if dist_info.rank == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except RunDirLocked as e:
            error = e
    refused = error is not None
    if dist_info.world > 1:
        refused = any_rank(refused, dist_info.device)
    if error is not None:
        raise error
    if refused:
        raise RunDirLocked(f"{run_dir} is in use by another run (rank 0 was refused the lock)")
    return lock


__all__ = [
    "EXIT_RUN_DIR_LOCKED",
    "LOCK_NAME",
    "RunDirLocked",
    "RunLock",
    "hold_run_lock",
    "holds_run_lock",
    "release_run_locks",
]
