"""The goodput ledger: a run's wall time split into productive training and each kind of loss.

Wall time is rank 0's: each process's lifetime from its own start (the operating system's start
time of the process, so interpreter and library imports count) to the moment of the ledger's
snapshot, summed over the processes of the run as the checkpoints recorded them. Every second
of it is charged to exactly one kind:

- `startup`: the first process, from its start to its first step; `restart`: the same for
  every later process (resume included);
- `productive`: the loop's time for a step trained for the first time (data, forward,
  backward, optimizer, logging);
- `replay`: a step trained again after a restart, because the process before it had trained
  it after its last checkpoint (known from metrics.jsonl's rows, which a kill leaves behind);
- `rollback`: a step trained again after a spike rollback, and the spiking step itself with
  the rollback's own time (finding and loading the checkpoint);
- `evaluation` (and any kind a callback declares as its `goodput_kind`, e.g. downstream
  evaluation): the time spent inside that callback's hooks;
- `checkpoint`: time the loop is blocked saving (the checkpoint callback's hooks: the staging
  of an async save, all of a sync one, the final save); `failed_save`: the same for a save
  that failed.

What the ledger cannot see: the time between a process's last snapshot (its last checkpoint)
and its death, and between its death and the next process's start. The first is stood for by
the `replay` of the steps it had trained since; the second is not in the wall time at all.

The ledger is the trainer's (`Trainer.goodput`), checkpointed through `state_dict()`; a
checkpoint without one (written before the ledger existed) resumes with the earlier processes
uncounted. A rollback loads an older checkpoint but not its ledger: wall time is not undone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from data_pipeline.runtime.progress import format_duration

KINDS = (
    "productive",
    "startup",
    "restart",
    "evaluation",
    "checkpoint",
    "failed_save",
    "rollback",
    "replay",
)
_IMPORTED = time.time()
_KEPT_SAVES = 64  # steps whose checkpoint seconds are kept, for a failure reported late


def process_start_time() -> float:
    """Unix time at which this process started. On Linux, from /proc (the process's start in
    clock ticks since boot, against /proc/uptime: both on the boot clock, to 10 ms); elsewhere
    the time this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return _IMPORTED


class GoodputLedger:
    """Charges the time since the last mark to the current kind at every transition."""

    def __init__(self, start: float | None = None):
        start = process_start_time() if start is None else start
        # One clock for every interval: monotonic, with the process start placed on it.
        self._mark = self.start = time.monotonic() - (time.time() - start)
        self.parts = dict.fromkeys(KINDS, 0.0)  # this process's
        self.earlier = dict.fromkeys(KINDS, 0.0)  # the earlier processes', from the checkpoint
        self.earlier_wall = 0.0
        self.processes = 1
        self.high_water = 0  # the highest step any process trained (and kept)
        self.redo_kind = "replay"  # what training a step again counts as
        self.restart = False
        self._kind = "startup"
        self._stack: list[tuple[str, int | None]] = []
        self._in_loop = False
        self._step_kind = "productive"
        self._step_seconds = 0.0  # charged to the current step's kind since it began
        self._save_step: int | None = None  # the step of the open checkpoint bracket
        self._saves: dict[int, float] = {}  # step -> checkpoint seconds charged at it
        self._failed: set[int] = set()

    # -- transitions ------------------------------------------------------------------------

    def _charge(self) -> None:
        now = time.monotonic()
        dt, self._mark = now - self._mark, now
        self.parts[self._kind] = self.parts.get(self._kind, 0.0) + dt
        if self._kind == self._step_kind and not self._stack:
            self._step_seconds += dt
        if self._kind == "checkpoint" and self._save_step is not None:
            self._saves[self._save_step] = self._saves.get(self._save_step, 0.0) + dt

    def restarted(self) -> None:
        """This process continues a run (it resumed, or found an earlier process's rows)."""
        self.restart = True

    def saw_steps(self, step: int) -> None:
        """An earlier process trained up to `step` (its last row in metrics.jsonl)."""
        if step > 0:
            self.restarted()
            self.high_water = max(self.high_water, step)

    def begin_step(self, step: int) -> None:
        """The loop starts `step`: what follows is that step's, until the next one."""
        self._charge()
        if not self._in_loop:
            self._in_loop = True
            if self.restart:
                self.parts["restart"] += self.parts["startup"]
                self.parts["startup"] = 0.0
        self._step_kind = "productive" if step > self.high_water else self.redo_kind
        self.high_water = max(self.high_water, step)
        self._kind, self._step_seconds = self._step_kind, 0.0

    @contextmanager
    def bracket(self, kind: str, step: int | None = None) -> Iterator[None]:
        """Time inside is `kind`'s (nested brackets charge their own kind)."""
        self._charge()
        self._stack.append((self._kind, self._save_step))
        self._kind = "failed_save" if kind == "checkpoint" and step in self._failed else kind
        if kind == "checkpoint":
            self._save_step = step
        try:
            yield
        finally:
            self._charge()
            self._kind, self._save_step = self._stack.pop()
            if len(self._saves) > _KEPT_SAVES:
                del self._saves[min(self._saves)]

    def save_failed(self, step: int) -> None:
        """The save of `step` failed: its blocking time so far, and any still to come, is
        `failed_save`."""
        self._charge()
        moved = self._saves.pop(step, 0.0)
        self.parts["checkpoint"] -= moved
        self.parts["failed_save"] += moved
        self._failed = {s for s in self._failed if s > step - _KEPT_SAVES} | {step}
        if self._kind == "checkpoint" and self._save_step == step:
            self._kind = "failed_save"

    def rolled_back(self, step: int) -> None:
        """A rollback undid `step` (the spiking one): its time so far and the rest of its
        iteration are `rollback`, and the steps up to it are trained again as `rollback`."""
        self._charge()
        self.parts[self._step_kind] -= self._step_seconds
        self.parts["rollback"] += self._step_seconds
        self._step_seconds = 0.0
        self._step_kind = self._kind = "rollback"
        if self.high_water == step:  # its training again is the first that counts
            self.high_water = step - 1
        self.redo_kind = "rollback"

    # -- what it says -----------------------------------------------------------------------

    def totals(self) -> tuple[dict[str, float], float]:
        """(seconds per kind, wall seconds) over every process recorded, up to now."""
        self._charge()
        parts = {k: self.earlier.get(k, 0.0) + self.parts.get(k, 0.0) for k in self.kinds()}
        return parts, self.earlier_wall + (self._mark - self.start)

    def kinds(self) -> list[str]:
        return [*KINDS, *sorted(({*self.parts, *self.earlier}) - set(KINDS))]

    def row(self) -> dict:
        """`{"goodput": productive / wall, "goodput/<kind>_s": ..., "goodput/wall_s": ...,
        "goodput/processes": n}`."""
        parts, wall = self.totals()
        row = {"goodput": parts["productive"] / wall if wall > 0 else 0.0}
        row.update({f"goodput/{k}_s": round(v, 3) for k, v in parts.items()})
        row["goodput/wall_s"] = round(wall, 3)
        row["goodput/processes"] = self.processes
        return row

    def state_dict(self) -> dict:
        parts, wall = self.totals()
        return {
            "parts": parts,
            "wall_s": wall,
            "processes": self.processes,
            "high_water": self.high_water,
        }

    def load_state_dict(self, state: dict) -> None:
        """The earlier processes' totals (a resume). Ignored once the loop runs: a rollback
        loads an older checkpoint, but the time since is spent all the same."""
        if self._in_loop:
            return
        self.earlier = {k: float(v) for k, v in state["parts"].items()}
        self.earlier_wall = float(state["wall_s"])
        self.processes = int(state["processes"]) + 1
        self.high_water = max(self.high_water, int(state["high_water"]))
        self.restarted()


def summary_line(row: dict) -> str:
    """The console's one line for a goodput row: the fraction, then every kind that took
    time, largest first."""
    wall = row["goodput/wall_s"]
    kinds = [
        (k[len("goodput/") : -2], v)
        for k, v in row.items()
        if k.startswith("goodput/") and k.endswith("_s") and k != "goodput/wall_s" and v >= 0.05
    ]
    kinds.sort(key=lambda kv: -kv[1])
    parts = ", ".join(f"{k} {_seconds(v)}" for k, v in kinds)
    n = row["goodput/processes"]
    return (
        f"goodput {100 * row['goodput']:.1f}% of {_seconds(wall)} wall time "
        f"({n} process{'es' if n != 1 else ''}): {parts}"
    )


def _seconds(s: float) -> str:
    """0.4s, 42.0s, then 1:02:03 (a tenth of a second matters in a short run's small kinds)."""
    return f"{s:.1f}s" if s < 60 else format_duration(s)
