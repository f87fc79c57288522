"""Hangs named by rank: per-rank heartbeats in the rendezvous store and a watchdog on rank 0.

A collective that never completes tells each waiting rank only that it waited; the rank that
is missing says nothing. So every rank publishes, beside the collectives, a small beat (its
step, the loop's span it is in and for how long, its host) to the c10d store the process
group was set up with (torchrun's agent store, or the TCPStore rank 0 hosts under a plain
env:// launch), from a daemon thread that needs no collective. Rank 0 reads all beats. When
rank 0 itself has made no progress for 90% of `parallel.timeout_s` and some ranks are missing,
it logs a `hang` row naming them (`missing_ranks`, `last_seen`) and a line with their hosts,
and ends its process with `EXIT_HANG`, so that torchrun (or srun) stops the others. 90%: the
report must be written before the backend's own timeout (NCCL's watchdog aborts the process at
`parallel.timeout_s`; gloo raises, which the observe callback reports the same way).

A missing rank is one whose beat stopped for half the timeout (the process stopped, killed, or
its host frozen), or, all beating, one whose progress (`PhaseTimer.seq`) is behind the others':
it has not reached the collective they wait in. All ranks in the same span and beating is a
long phase, not a hang, and is left alone.

The same thread measures stalls for the phase timing: a tick that comes a second or more late
means the whole process was not running (SIGSTOP, a frozen host), time the rank's peers spent
waiting for it (opt_train/train/phase_timing.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_HANG = 89  # "a collective hung; the missing ranks are named in the log and metrics.jsonl"
HANG_AT = 0.9  # of parallel.timeout_s without progress on rank 0
TICK_S = 0.2  # the stall clock's period
# Seconds between beats: the store serves every rank (4096 ranks: 4096 small writes a second),
# and a frozen rank's last beat is up to this old.
BEAT_S = 1.0
STALL_MIN_S = 1.0  # a tick later than this is a stall (a loaded host delays ticks less)


class Progress(Protocol):
    """What a heartbeat reports (opt_train.train.phase_timing.PhaseTimer)."""

    step: int
    phase: str
    seq: int
    entered: float

    def add_stall(self, seconds: float) -> None: ...


def side_store() -> dist.Store | None:
    """A connection of this thread's own to the store the default process group was set up
    with (a clone: a store client is not shared between threads), or None when alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    base = dist.distributed_c10d._get_default_store()
    return dist.PrefixStore("opt-train/heartbeat/", base.clone())


def missing_ranks(beats: dict[int, dict], silent_s: dict[int, float], stale_s: float) -> list[int]:
    """The ranks the others wait for: those silent for `stale_s` or more, or else those whose
    progress (`seq`) is behind the furthest rank's. `beats`: each rank's last beat;
    `silent_s`: seconds since each rank's beat last changed."""
    stale = sorted(r for r, s in silent_s.items() if s >= stale_s)
    if stale:
        return stale
    top = max(b["seq"] for b in beats.values())
    return sorted(r for r, b in beats.items() if b["seq"] < top)


class Heartbeat:
    """This rank's beat every `beat_s` seconds and stall clock; on rank 0 also the watchdog,
    which calls `on_hang(report)` once, then exits the process with EXIT_HANG."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        host: str,
        progress: Progress,
        timeout_s: float,
        on_hang: Callable[[dict], None],
    ):
        self.store, self.rank, self.world, self.host = store, rank, world, host
        self.progress, self.timeout_s, self.on_hang = progress, timeout_s, on_hang
        self.beat_s = BEAT_S
        self._stop = threading.Event()
        self._reporting = threading.Lock()
        self._count = 0
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (beat count, when it changed)
        self._beats: dict[int, dict] = {}
        self._own = (progress.seq, time.monotonic())
        self._thread = threading.Thread(target=self._run, name="opt-train-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._publish()  # before the first step, so rank 0 finds every beat from step one
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _publish(self) -> None:
        p = self.progress
        self._count += 1
        beat = {
            "n": self._count,
            "step": p.step,
            "phase": p.phase,
            "seq": p.seq,
            "in_phase_s": round(time.monotonic() - p.entered, 3),
            "host": self.host,
        }
        self.store.set(f"rank_{self.rank}", json.dumps(beat))

    def _run(self) -> None:
        last = next_beat = time.monotonic()
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            if now - last - TICK_S >= STALL_MIN_S:
                self.progress.add_stall(now - last - TICK_S)
            last = now
            if now < next_beat:
                continue
            next_beat = now + self.beat_s
            try:
                self._publish()
                if self.rank == 0:
                    self._watch(now)
            except Exception as e:  # the store is gone (the agent ended): nothing to watch
                if not self._stop.is_set():
                    log.warning("heartbeat stopped: %s", e)
                return

    def _read(self, now: float) -> None:
        keys = [f"rank_{r}" for r in range(self.world)]
        if not self.store.check(keys):  # a rank has not published yet (still starting)
            return
        for r, raw in enumerate(self.store.multi_get(keys)):
            beat = json.loads(raw)
            if self._seen.get(r, (None,))[0] != beat["n"]:
                self._seen[r] = (beat["n"], now)
            self._beats[r] = beat

    def _watch(self, now: float) -> None:
        self._read(now)
        seq = self.progress.seq
        if seq != self._own[0]:
            self._own = (seq, now)
        if now - self._own[1] >= HANG_AT * self.timeout_s and len(self._beats) == self.world:
            report = self.report(now)
            if report["missing_ranks"]:
                self.hang(report)

    def report(self, now: float | None = None) -> dict:
        """The hang row's fields from the beats read so far (rank 0)."""
        now = time.monotonic() if now is None else now
        silent = {r: now - seen for r, (_, seen) in self._seen.items()}
        missing = missing_ranks(self._beats, silent, self.timeout_s / 2) if self._beats else []
        last_seen = {}
        for r in sorted({0, *missing} & set(self._beats)):
            b = self._beats[r]
            last_seen[str(r)] = {
                "step": b["step"],
                "phase": b["phase"],
                "s_ago": round(b["in_phase_s"] + silent[r], 1),
                "host": b["host"],
            }
        return {
            "missing_ranks": missing,
            "last_seen": last_seen,
            "waited_s": round(now - self._own[1], 1),
            "timeout_s": self.timeout_s,
        }

    def hang(self, report: dict) -> None:
        """Report once (`on_hang`), then end this process with EXIT_HANG: its main thread is
        stuck in a collective, which no exception reaches."""
        self._reporting.acquire()  # a second caller waits for the first one's exit
        try:
            self.on_hang(report)
        finally:
            logging.shutdown()  # flush the log line
            os._exit(EXIT_HANG)


def hang_line(report: dict, step: int) -> str:
    """The log line of a hang report, naming the missing ranks and their hosts."""
    seen = report["last_seen"]
    who = ", ".join(
        f"rank {r} on {seen[str(r)]['host']} (last seen in step {seen[str(r)]['step']}, "
        f"{seen[str(r)]['phase']}, {seen[str(r)]['s_ago']:g} s ago)"
        for r in report["missing_ranks"]
        if str(r) in seen
    )
    return (
        f"hang at step {step}: no progress for {report['waited_s']:g} s "
        f"(parallel.timeout_s={report['timeout_s']:g}); missing: {who or 'unknown'}; "
        f"exiting with status {EXIT_HANG}"
    )
