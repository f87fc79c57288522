"""Checkpoint cadence: when the trainer saves, and what a failed save does to the run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from opt_train.checkpoint.manager import CheckpointSaveFailed
from opt_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer

log = logging.getLogger(__name__)


class Checkpointing(Callback):
    """Saves every `checkpoint.interval` steps, at the end of the run, and (blocking) when
    every rank agreed on a preemption; the final save is on disk before the run reports
    success.

    A failed save (opt_train/checkpoint/manager.py) becomes a `checkpoint_failed` event row at the
    step its failure is known (at once for a sync save, a later step for an async one) and
    training goes on; after `checkpoint.max_failures` in a row the run stops, and `on_end`
    raises CheckpointSaveFailed (exit status 86) instead of reporting success."""

    goodput_kind = "checkpoint"

    def __init__(self, interval: int):
        self.interval = interval

    def post_step(self, trainer: Trainer) -> None:
        if self.interval and trainer.step % self.interval == 0:
            trainer.save()
        self._report(trainer)

    def on_end(self, trainer: Trainer) -> None:
        ckpt = trainer.ckpt
        ckpt.wait()
        self._report(trainer)
        if trainer.preempted:
            log.warning("preempted: saving step %d, then exiting", trainer.step)
        # The final save, tried again at once if it fails, until max_failures in a row.
        while (
            (trainer.preempted or trainer.step > trainer.resumed_step)
            and ckpt.last_saved_step != trainer.step
            and not ckpt.gave_up
        ):
            trainer.save(blocking=trainer.preempted)
            ckpt.wait()
            self._report(trainer)
        if ckpt.gave_up:
            raise CheckpointSaveFailed(ckpt.last_failure.give_up_message())

    def _report(self, trainer: Trainer) -> None:
        for failure in trainer.ckpt.poll():
            trainer.log_event("checkpoint_failed", **failure.event())
            if failure.gave_up:
                trainer.request_stop(failure.give_up_message())
