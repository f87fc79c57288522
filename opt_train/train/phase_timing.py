"""Where each rank's step time goes: per-rank phase timing and the straggler rule.

The loop marks its phases on one `PhaseTimer` per rank (`enter`); every `logging.interval`
steps the observe callback gathers each rank's seconds per step in one all-gather of a small
float tensor (`gather_phases`), `phase_row` reduces them to the median, the max and the slowest
rank per phase, and `StragglerWatch` names a rank whose compute stays above the others.
docs/observability.md, "Phase timing", defines each phase; in short, per rank and per step:

- data: waiting for the step's batches from the loader.
- compute: this rank's own work in forward/backward, the loss all-reduce and the stop agreement.
  On CPU, the main thread's CPU time there plus stalls (the whole process stopped or not run
  for a second or more: SIGSTOP, a frozen host), so that a rank waiting for a peer in a
  collective (blocked, no CPU) is told from the peer it waits for. On CUDA the host's CPU time
  says nothing of the GPU's: compute is the wall time of forward/backward, synchronized at its
  ends on the timed step, and FSDP's waits inside it count as compute.
- collective: the rest of that span, time blocked on peers (FSDP's all-gathers and
  reduce-scatters, the loop's all-reduces); on CUDA the loop's all-reduces only.
- optimizer: the gradient norm, clipping and the optimizer step (wall time).
- checkpoint: the part of a save that blocks training (staging to host memory; wall time).
- step: all of the step's wall time, evaluation and callbacks included.

On CPU every step is timed (reading two clocks costs microseconds); on CUDA only the last step
of each interval, with a synchronize at its phase boundaries, so no other step waits for the GPU.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

PHASES = ("data", "compute", "collective", "optimizer", "checkpoint", "step")
# The loop's spans (what `enter` takes, and what a heartbeat reports as the phase a rank is in).
WORK_SPANS = ("forward_backward", "loss_reduce", "stop_agree")


class PhaseTimer:
    """This rank's phase clock: its current step and phase (read by the heartbeat thread) and,
    while timing, the wall and main-thread CPU seconds of each span since the last `take`."""

    def __init__(self, enabled: bool, device: torch.device, interval: int):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.interval = interval
        # Progress: every rank enters the same spans in the same order, so `seq` (spans
        # entered) compares across ranks; a rank with a lower seq has not reached the
        # collective the others wait in.
        self.step, self.phase, self.seq = 0, "start", 0
        self.entered = time.monotonic()
        self.stalled_s = 0.0  # added to by the heartbeat thread (opt_train/train/heartbeat.py)
        self._timing = False
        self._t, self._cpu = time.perf_counter(), time.thread_time()
        self._reset()

    def _reset(self) -> None:
        self._wall: dict[str, float] = {}
        self._cpu_s: dict[str, float] = {}
        self._steps = 0
        self._stall_mark = self.stalled_s

    def begin_step(self, step: int) -> None:
        """A new optimizer step starts: it waits for its data first."""
        self.step = step
        self._timing = self.enabled and (not self.cuda or step % self.interval == 0)
        if self._timing:
            self._steps += 1
        self.enter("data")

    def enter(self, span: str) -> None:
        """Close the current span and open `span`."""
        if self._timing and self.cuda:
            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.thread_time()
        if self._timing:
            self._wall[self.phase] = self._wall.get(self.phase, 0.0) + now - self._t
            self._cpu_s[self.phase] = self._cpu_s.get(self.phase, 0.0) + cpu - self._cpu
        self._t, self._cpu = now, cpu
        self.phase, self.seq, self.entered = span, self.seq + 1, time.monotonic()

    @contextlib.contextmanager
    def span(self, span: str) -> Iterator[None]:
        """`span` for the duration of a block (a save, an evaluation), then back to the span
        that was open."""
        previous = self.phase
        self.enter(span)
        try:
            yield
        finally:
            self.enter(previous)

    def add_stall(self, seconds: float) -> None:
        self.stalled_s += seconds

    def take(self) -> list[float]:
        """Seconds per timed step of each of PHASES since the last take, and start anew."""
        self.enter(self.phase)  # close the open span so far
        n = max(1, self._steps)
        wall, cpu = self._wall, self._cpu_s
        stall = self.stalled_s - self._stall_mark
        work_wall = sum(wall.get(s, 0.0) for s in WORK_SPANS)
        total = sum(wall.values())
        if self.cuda:
            compute = wall.get("forward_backward", 0.0)
        else:  # a stall anywhere in the step counts as this rank's own time
            compute = min(total, sum(cpu.get(s, 0.0) for s in WORK_SPANS) + stall)
        out = [
            wall.get("data", 0.0),
            compute,
            max(0.0, work_wall - compute),
            wall.get("optimizer", 0.0),
            wall.get("checkpoint", 0.0),
            total,
        ]
        self._reset()
        return [v / n for v in out]


def gather_phases(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's `values` (the same length on each), in rank order: one all-gather of a
    float tensor. Collective; alone, `[values]`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = mine.new_empty(dist.get_world_size() * len(values))
    dist.all_gather_single(out, mine)
    return out.view(-1, len(values)).tolist()


def phase_row(table: list[list[float]]) -> dict[str, dict]:
    """Per phase, over ranks: `median_s`, `max_s` and `slowest_rank` (the lowest rank among
    equals). `table[rank]` holds that rank's seconds in PHASES order."""
    row = {}
    for i, name in enumerate(PHASES):
        col = [r[i] for r in table]
        slowest = max(range(len(col)), key=lambda r: (col[r], -r))
        row[name] = {
            "median_s": statistics.median(col),
            "max_s": col[slowest],
            "slowest_rank": slowest,
        }
    return row


class StragglerWatch:
    """Names a rank whose compute exceeds `factor` x the median of the other ranks' for
    `intervals` intervals in a row: once per streak, when the streak reaches `intervals`."""

    def __init__(self, factor: float, intervals: int):
        self.factor, self.intervals = factor, intervals
        self.streak: dict[int, int] = {}

    def update(self, compute: list[float]) -> list[tuple[int, float]]:
        """This interval's compute seconds per rank -> [(rank, median of the others)] for each
        rank whose streak reached `intervals` now."""
        named = []
        for rank, c in enumerate(compute):
            others = compute[:rank] + compute[rank + 1 :]
            median = statistics.median(others) if others else c
            slow = bool(others) and c > self.factor * median
            self.streak[rank] = self.streak.get(rank, 0) + 1 if slow else 0
            if self.streak[rank] == self.intervals:
                named.append((rank, median))
        return named
