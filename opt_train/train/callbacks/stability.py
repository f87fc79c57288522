"""Automatic loss-spike recovery (`stability.*`) and hand-given LR and clipping changes.

What OPT-175B's team did by hand dozens of times, as a callback: after each step, compare the
loss (and optionally the gradient norm) with a robust baseline, the median of the last
`stability.window` steps; a value above `factor` x the median, or `stability.nonfinite_steps`
NaN/inf steps in a row, is a spike. The response:

1. find where the spike began (the first of the run of steps just before it that were already
   above halfway to the threshold, at most `window` back; the first of the NaN/inf steps) and
   the newest checkpoint from before that step;
2. load it (`Trainer.load_checkpoint`: weights, optimizer, RNG, loader position, counters);
3. put the global batches read since that checkpoint on the skip list (`data.skip_steps`
   semantics: they are consumed, not reordered, so the global order stays the seed's);
4. optionally multiply the LR by `lr_factor` for `lr_steps` steps and clip at
   `clip_grad_norm` for `clip_steps` steps (`optim.lr_changes` / `optim.clip_changes` entries);
5. drop metrics.jsonl's rows after the checkpoint, write the `spike` and `rollback` event rows
   (both name the documents of the spiking step: `documents`, [source, shard, doc] each), and
   continue. More than `max_rollbacks` rollbacks within `window_steps` steps stop the run
   with `EXIT_ROLLBACK_LIMIT` (88) and the checkpoints left as they are.

Every input to a decision is a value all ranks share (the all-reduced loss, the global gradient
norm, the non-finite counter, rank 0's listing of checkpoints, broadcast), so every rank rolls
back at the same step to the same checkpoint without further agreement.

The decisions (skip list, LR and clipping changes, rollbacks so far, event rows) are this
callback's checkpointed state and survive both a rollback and a restart; the detector's
history belongs to the weights and goes back with them. A run that rolled back therefore
continues exactly as a fresh run resumed from that checkpoint with `data.skip_steps`,
`optim.lr_changes` and `optim.clip_changes` set to what the rollback row says.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from typing import TYPE_CHECKING

from opt_train.checkpoint.layout import STEP_DIR
from opt_train.config import JobConfig
from opt_train.data.provenance import compact, last_step_documents
from opt_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer

log = logging.getLogger(__name__)

EXIT_ROLLBACK_LIMIT = 88  # "too many rollbacks: the spikes are not the data's fault"


class RollbackLimit(SystemExit):
    """More than `stability.max_rollbacks` rollbacks within `stability.window_steps` steps.

    A SystemExit, so the process ends with `EXIT_ROLLBACK_LIMIT` wherever it is raised, after
    the callbacks' on_close; the message is logged (and kept in `message`)."""

    def __init__(self, message: str):
        super().__init__(EXIT_ROLLBACK_LIMIT)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Stability(Callback):
    """Applies `optim.lr_changes` / `optim.clip_changes` and, with `stability.enabled`, detects
    spikes and rolls back (module docstring). Runs after the built-in callbacks, so
    metrics.jsonl is open when it writes."""

    name = "stability"

    @staticmethod
    def wanted(cfg: JobConfig) -> bool:
        return bool(cfg.stability.enabled or cfg.optim.lr_changes or cfg.optim.clip_changes)

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg.stability
        self.enabled = cfg.stability.enabled
        self.given_skips = [list(map(int, r)) for r in cfg.data.skip_steps]
        self.given_lr = [_change(r) for r in cfg.optim.lr_changes]
        self.given_clip = [_change(r) for r in cfg.optim.clip_changes]
        self.default_clip = cfg.optim.clip_grad_norm
        # Goes back with the weights: [step, loss, grad_norm or None] of the last `window`
        # steps with a finite loss.
        self.history: list[list] = []
        # Decisions, kept across rollbacks.
        self.skip_steps: list[list[int]] = []  # original steps, as data.skip_steps
        self.lr_changes: list[list] = []  # [first, last, factor], as optim.lr_changes
        self.clip_changes: list[list] = []  # [first, last, max_norm], as optim.clip_changes
        self.rollback_steps: list[int] = []  # the steps that triggered a rollback
        self.events: list[dict] = []  # every event row written, for a restart (on_start)
        self._base_schedule = None

    # -- the hooks ----------------------------------------------------------------------------

    def on_start(self, trainer: Trainer) -> None:
        if self._base_schedule is None:
            self._base_schedule = trainer.schedule
            trainer.schedule = self.lr  # the loop's LR is schedule(step): now with the changes
        self._apply(trainer)
        # Rows of events that the resumed state holds but that metrics.jsonl dropped with the
        # steps after the checkpoint (a rollback whose replay had passed this checkpoint).
        if events := self._events_after(trainer.step):
            trainer.rewind(trainer.step, events)

    def pre_step(self, trainer: Trainer) -> None:
        if self.given_clip or self.clip_changes:
            trainer.engine.clip = self.clip(trainer.step)

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        if not self.enabled:
            return
        spike = self._detect(trainer, metrics)
        if spike is None:
            self._remember(metrics)
        else:
            self._respond(trainer, metrics, spike)

    def state_dict(self) -> dict:
        if not self.enabled:
            return {}
        return {"history": self.history, **self._decisions()}

    def load_state_dict(self, state: dict) -> None:
        if not self.enabled:
            # Off on this resume: the automatic decisions still ahead are dropped, and those
            # given by hand (optim.lr_changes ...) are not applied twice.
            return
        self.history = [list(h) for h in state["history"]]
        self._set_decisions(state)

    # -- LR and clipping ----------------------------------------------------------------------

    def lr(self, step: int) -> float:
        """The schedule's LR for `step` times every change covering it."""
        factor = 1.0
        for first, last, f in (*self.given_lr, *self.lr_changes):
            if first <= step <= last:
                factor *= f
        return self._base_schedule(step) * factor

    def clip(self, step: int) -> float:
        """The clipping threshold for `step`: the last change covering it, else the config's."""
        out = self.default_clip
        for first, last, max_norm in (*self.given_clip, *self.clip_changes):
            if first <= step <= last:
                out = max_norm
        return out

    def _apply(self, trainer: Trainer) -> None:
        trainer.loader.skip_steps = sorted(tuple(r) for r in (*self.given_skips, *self.skip_steps))

    # -- detection ----------------------------------------------------------------------------

    def _detect(self, trainer: Trainer, metrics: dict) -> dict | None:
        """The spike this step shows, if any: reason, value, baseline, threshold, onset."""
        step, cfg = metrics["step"], self.cfg
        bad = trainer.nonfinite_in_a_row
        if cfg.nonfinite_steps and bad >= cfg.nonfinite_steps:
            return {"reason": "nonfinite", "value": metrics["loss"], "onset": step - bad + 1}
        if len(self.history) < cfg.window:
            return None
        for reason, col, factor in (
            ("loss", 1, cfg.loss_factor),
            ("grad_norm", 2, cfg.grad_factor),
        ):
            value = metrics[reason]
            past = [h[col] for h in self.history if h[col] is not None]
            if not factor or not math.isfinite(value) or len(past) < cfg.window // 2 + 1:
                continue
            baseline = statistics.median(past)
            if value > factor * baseline:
                # Where it began: the unbroken run of steps just before it already above
                # halfway to the threshold.
                elevated = baseline * (1 + (factor - 1) / 2)
                onset = step
                for h in reversed(self.history):
                    if h[col] is None or h[col] <= elevated or h[0] != onset - 1:
                        break
                    onset = h[0]
                return {
                    "reason": reason,
                    "value": value,
                    "baseline": baseline,
                    "threshold": factor * baseline,
                    "onset": onset,
                }
        return None

    def _remember(self, metrics: dict) -> None:
        loss, grad = metrics["loss"], metrics["grad_norm"]
        if math.isfinite(loss):
            self.history.append([metrics["step"], loss, grad if math.isfinite(grad) else None])
            del self.history[: -self.cfg.window]

    # -- the response -------------------------------------------------------------------------

    def _respond(self, trainer: Trainer, metrics: dict, spike: dict) -> None:
        cfg, step = self.cfg, trainer.step
        # The documents of the spiking step's global batch (every rank's, computed from the
        # loader's order: opt_train/data/provenance.py), before the rollback moves the loader.
        documents = compact(last_step_documents(trainer.loader))
        spike_row = {"event": "spike", "step": step, **spike, "documents": documents}
        recent = [s for s in self.rollback_steps if s > step - cfg.window_steps]
        if len(recent) >= cfg.max_rollbacks:
            self._event(trainer, {**spike_row, "action": "stop"})
            message = (
                f"step {step}: {spike['reason']} spike ({spike['value']:.4g}) after "
                f"{len(recent)} rollbacks within {cfg.window_steps} steps (stability."
                f"max_rollbacks={cfg.max_rollbacks}): skipping data does not cure it. Stopping "
                "with the checkpoints as they are; resume with a lower optim.lr (or "
                "stability.lr_factor), more stability.max_rollbacks, or data.skip_steps by hand "
                "(docs/fault-tolerance.md)."
            )
            log.error(message)
            raise RollbackLimit(message)
        target = self._target(trainer, spike["onset"])
        if target is None:
            self._event(trainer, {**spike_row, "action": "none"})
            log.warning(
                "step %d: %s spike (%.4g) but no checkpoint from before step %d to roll back to; "
                "going on",
                step,
                spike["reason"],
                spike["value"],
                spike["onset"],
            )
            return
        samples_at_spike = trainer.loader.samples_seen
        decisions = copy.deepcopy(self._decisions())
        self.history = []  # replaced by the checkpoint's (it may have none)
        trainer.load_checkpoint(trainer.ckpt.step_dir(target))
        self._set_decisions(decisions)

        batch = trainer.loader.global_batch
        skip = [trainer.loader.samples_seen // batch + 1, samples_at_spike // batch]
        self.skip_steps.append(skip)
        rollback = {
            "event": "rollback",
            "step": step,
            "to_step": target,
            "skipped_steps": [target + 1, step],  # this run's steps whose batches are skipped
            "skip_steps": skip,  # the same batches as data.skip_steps (original steps)
            "documents": documents,  # those of the spiking step (its batch is skipped)
        }
        if cfg.lr_steps and cfg.lr_factor != 1.0:
            change = [target + 1, target + cfg.lr_steps, cfg.lr_factor]
            self.lr_changes.append(change)
            rollback["lr_change"] = change
        if cfg.clip_grad_norm:
            change = [target + 1, target + cfg.clip_steps, cfg.clip_grad_norm]
            self.clip_changes.append(change)
            rollback["clip_change"] = change
        self.rollback_steps.append(step)
        self._apply(trainer)
        rollback["data_skip_steps"] = [list(r) for r in trainer.loader.skip_steps]
        trainer.rewind(target, self._events_after(target))
        self._event(trainer, {**spike_row, "action": "rollback"})
        self._event(trainer, rollback)
        log.warning(
            "step %d: %s spike (%.4g, baseline %s): rolled back to step %d, skipping the "
            "batches of steps %d-%d (data.skip_steps %s)%s%s",
            step,
            spike["reason"],
            spike["value"],
            f"{spike['baseline']:.4g}" if "baseline" in spike else "-",
            target,
            target + 1,
            step,
            skip,
            f", LR x{cfg.lr_factor} for {cfg.lr_steps} steps" if "lr_change" in rollback else "",
            f", clipping at {cfg.clip_grad_norm} for {cfg.clip_steps} steps"
            if "clip_change" in rollback
            else "",
        )

    def _target(self, trainer: Trainer, onset: int) -> int | None:
        """The newest checkpoint from before step `onset` that verifies (a damaged one is
        skipped for the one before it), once every save has finished."""
        trainer.ckpt.wait()
        path = trainer.ckpt.latest(before=onset)
        return None if path is None else int(STEP_DIR.match(path.name).group(1))

    def _events_after(self, step: int) -> list[dict]:
        """The event rows after `step`: they describe decisions still in force, so they are
        written again when the rows after `step` are dropped (at a rollback, or at a restart
        from a checkpoint that a rollback's replay had passed)."""
        return [row for row in self.events if row["step"] > step]

    def _event(self, trainer: Trainer, row: dict) -> None:
        self.events.append(row)
        trainer.log(row)

    def _decisions(self) -> dict:
        return {
            "skip_steps": self.skip_steps,
            "lr_changes": self.lr_changes,
            "clip_changes": self.clip_changes,
            "rollback_steps": self.rollback_steps,
            "events": self.events,
        }

    def _set_decisions(self, state: dict) -> None:
        self.skip_steps = [list(r) for r in state["skip_steps"]]
        self.lr_changes = [list(r) for r in state["lr_changes"]]
        self.clip_changes = [list(r) for r in state["clip_changes"]]
        self.rollback_steps = list(state["rollback_steps"])
        self.events = [dict(r) for r in state["events"]]


def _change(r) -> list:
    return [int(r[0]), int(r[1]), float(r[2])]


__all__ = ["EXIT_ROLLBACK_LIMIT", "RollbackLimit", "Stability"]
