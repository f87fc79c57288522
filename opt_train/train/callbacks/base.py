"""The callback base: the hooks the loop (opt_train/train/trainer.py) calls and when. Each
callback is a module of its own beside this one and keeps its own state (and, where it must
survive a restart, its own `state_dict`); `defaults.py` lists the built-in ones.

Hooks run on every rank, in the order of `Trainer.callbacks` (the built-in ones, then those
passed to `Trainer(cfg, callbacks=[...])`). A hook that writes files checks
`trainer.dist.is_main`; one that makes a collective call must do so on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer


class Callback:
    """Every hook does nothing unless overridden.

    The step's `metrics` are the same on every rank for the values the ranks agree on (step,
    loss, lr, grad_norm, loss_scale, skipped, tokens, nonfinite_skips, act_rms), so a decision
    made from those alone is the same on every rank without communication; timings
    (tokens_per_s, mfu, step_time_s) are this rank's own."""

    name: str = ""  # the key of this callback's entry in the checkpoint; the class name if empty
    # The goodput ledger's kind for the time spent in this callback's hooks ("evaluation",
    # "checkpoint", ...: opt_train/train/goodput.py); None: the step's own time.
    goodput_kind: str | None = None

    def on_start(self, trainer: Trainer) -> None:
        """Once per `fit`, after the resume (`trainer.step` is the step resumed at), before
        the first step."""

    def pre_step(self, trainer: Trainer) -> None:
        """Before a step's micro-batches; `trainer.step` is the step about to run (1-based)."""

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        """After the optimizer step, before its row is written: add keys to `metrics`, log
        event rows (`trainer.log_event`), ask to stop (`trainer.request_stop`)."""

    def post_step(self, trainer: Trainer) -> None:
        """After the step's row is written (evaluation and checkpoint cadence run here)."""

    def on_eval(self, trainer: Trainer, metrics: dict) -> None:
        """After an evaluation, before its row ({"step", "val_loss", ...}) is written: add
        keys to it."""

    def on_log(self, trainer: Trainer, row: dict) -> None:
        """Every row bound for metrics.jsonl, in the order logged: step rows, eval rows and
        event rows (those carry "event"). The sinks (file, wandb, console) write here."""

    def on_rewind(self, trainer: Trainer, step: int, events: list[dict]) -> None:
        """The rows logged after `step` no longer hold: a rollback loaded `step`'s checkpoint
        (opt_train/train/callbacks/stability.py), or a restart from it found them. A sink that
        keeps rows drops those after `step`, then writes `events`, the event rows after `step`
        that stay in force; a sink that only appends (wandb, the console) keeps what it showed."""

    def on_end(self, trainer: Trainer) -> None:
        """The loop ended without an error: `train.max_steps` reached, or a stop agreed by
        every rank (`trainer.preempted` tells a preemption from `trainer.stop_reason`)."""

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        """Always, last: release files and services; `error` is what ended `fit`, if anything."""

    def state_dict(self) -> dict:
        """What survives a restart; an empty dict stores nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @property
    def key(self) -> str:
        return self.name or type(self).__name__
