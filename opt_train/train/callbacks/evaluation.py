"""Validation loss at a fixed cadence (`train.eval_interval`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opt_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer


class Evaluation(Callback):
    """Validation loss every `train.eval_interval` steps (0 disables)."""

    goodput_kind = "evaluation"

    def __init__(self, interval: int):
        self.interval = interval

    def post_step(self, trainer: Trainer) -> None:
        if self.interval and trainer.val_sets and trainer.step % self.interval == 0:
            trainer.run_evaluation()
