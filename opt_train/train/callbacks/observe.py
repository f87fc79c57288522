"""Phase timing rows, straggler rows and named hangs (`observe`; docs/observability.md).

Every `logging.interval` steps each rank's phase seconds (the trainer's PhaseTimer,
opt_train/train/phase_timing.py) come to rank 0 in one all-gather; the step's row gets a
`timing` entry (per phase: median, max, slowest rank) and a rank that computes longer than the
others for `observe.straggler_intervals` intervals gets a `straggler` event row. The heartbeat
thread (opt_train/train/heartbeat.py) names the ranks a hung collective waits for.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from opt_train.parallel.process_groups import each_rank
from opt_train.train.callbacks.base import Callback
from opt_train.train.heartbeat import Heartbeat, hang_line, side_store
from opt_train.train.phase_timing import PHASES, StragglerWatch, gather_phases, phase_row
from opt_train.train.run_lock import release_run_locks

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer

log = logging.getLogger(__name__)


class Observe(Callback):
    def __init__(self, timing: bool, heartbeat: bool, factor: float, intervals: int):
        self.timing, self.heartbeat_on = timing, heartbeat
        self.stragglers = StragglerWatch(factor, intervals)
        self.factor, self.intervals = factor, intervals
        self.heartbeat: Heartbeat | None = None
        self.hosts: list[str] = []

    def on_start(self, trainer: Trainer) -> None:
        self.hosts = each_rank(socket.gethostname())
        self.trainer = trainer
        store = side_store() if self.heartbeat_on else None
        if store is not None:
            self.heartbeat = Heartbeat(
                store,
                trainer.dist.rank,
                trainer.dist.world,
                self.hosts[trainer.dist.rank],
                trainer.phases,
                trainer.cfg.parallel.timeout_s,
                self._on_hang,
            ).start()

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        if not self.timing or trainer.step % trainer.cfg.logging.interval:
            return
        table = gather_phases(trainer.phases.take(), trainer.device)
        if not trainer.dist.is_main:
            return
        metrics["timing"] = phase_row(table)
        compute = [row[PHASES.index("compute")] for row in table]
        for rank, median in self.stragglers.update(compute):
            log.warning(
                "straggler: rank %d on %s computed %.3f s per step against the other ranks' "
                "median %.3f s for %d logging intervals in a row (observe.straggler_factor=%g)",
                rank,
                self.hosts[rank],
                compute[rank],
                median,
                self.intervals,
                self.factor,
            )
            trainer.log_event(
                "straggler",
                rank=rank,
                host=self.hosts[rank],
                compute_s=round(compute[rank], 4),
                median_s=round(median, 4),
            )

    def _on_hang(self, report: dict) -> None:
        """Rank 0, from the heartbeat thread (its main thread is stuck in the collective) or
        from on_close (the collective timed out first): the row, the line, the run lock."""
        trainer = self.trainer
        log.error("%s", hang_line(report, trainer.step))
        trainer.log_event("hang", **report)
        release_run_locks()

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        hb, self.heartbeat = self.heartbeat, None
        if hb is None:
            return
        if error is not None and trainer.dist.is_main and _timed_out(error):
            report = hb.report()
            if report["missing_ranks"]:
                hb.hang(report)  # does not return
        hb.stop()


def _timed_out(error: BaseException) -> bool:
    """A collective's timeout (gloo: "Timed out waiting 30000ms for recv operation"). Not a
    peer that crashed ("Connection closed by peer"): that is a failure torchrun reports with
    the crashed rank's own error, not a hang."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)
