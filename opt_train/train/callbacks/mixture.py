"""What a mixture (`data.sources`) adds to the run's rows: tokens per source, and when a source
starts over (the mixture itself is opt_train/data/mixture.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from opt_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer


class SourceTokens(Callback):
    """Adds `tokens_by_source` (cumulative training tokens of each named source) to every step
    row, and an event row `{"event": "data_repeat", "source": ...}` the step a source first
    starts over (the loader says so in the log too)."""

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        loader = trainer.loader
        for name in loader.repeated_this_step:
            trainer.log_event("data_repeat", source=name)
        metrics["tokens_by_source"] = loader.tokens_by_source()
