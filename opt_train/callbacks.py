"""Side concerns of a run as callbacks: metrics.jsonl, the progress bar, wandb, evaluation and
checkpoint cadence. The loop in opt_train/trainer.py calls the hooks; each callback keeps its
own state (and, where it must survive a restart, its own `state_dict`).

Hooks run on every rank, in the order of `Trainer.callbacks` (the built-in ones, then those
passed to `Trainer(cfg, callbacks=[...])`). A hook that writes files checks
`trainer.dist.is_main`; one that makes a collective call must do so on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from opt_train.run_files import JsonlAppender, write_text_atomic

if TYPE_CHECKING:
    from opt_train.trainer import Trainer

log = logging.getLogger(__name__)


class Callback:
    """Every hook does nothing unless overridden.

    The step's `metrics` are the same on every rank for the values the ranks agree on (step,
    loss, lr, grad_norm, loss_scale, skipped, tokens, nonfinite_skips, act_rms), so a decision
    made from those alone is the same on every rank without communication; timings
    (tokens_per_s, mfu, step_time_s) are this rank's own."""

    name: str = ""  # the key of this callback's entry in the checkpoint; the class name if empty

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


class Evaluation(Callback):
    """Validation loss every `train.eval_interval` steps (0 disables)."""

    def __init__(self, interval: int):
        self.interval = interval

    def post_step(self, trainer: Trainer) -> None:
        if self.interval and trainer.val_batches and trainer.step % self.interval == 0:
            trainer.run_evaluation()


class Checkpointing(Callback):
    """Saves every `checkpoint.interval` steps, at the end of the run, and (blocking) when
    every rank agreed on a preemption; the final save is on disk before the run reports
    success.

    A failed save (opt_train/checkpoint.py) becomes a `checkpoint_failed` event row at the
    step its failure is known (at once for a sync save, a later step for an async one) and
    training goes on; after `checkpoint.max_failures` in a row the run stops, and `on_end`
    raises CheckpointSaveFailed (exit status 86) instead of reporting success."""

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
            from opt_train.checkpoint import CheckpointSaveFailed

            raise CheckpointSaveFailed(ckpt.last_failure.give_up_message())

    def _report(self, trainer: Trainer) -> None:
        for failure in trainer.ckpt.poll():
            trainer.log_event("checkpoint_failed", **failure.event())
            if failure.gave_up:
                trainer.request_stop(failure.give_up_message())


class MetricsFile(Callback):
    """`run_dir/metrics.jsonl`, one JSON object per row, written by rank 0."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None

    def on_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            _drop_rows_after(self.path, trainer.step)
            # Whole lines only; a failed write is reported and retried (opt_train/run_files.py).
            self._file = JsonlAppender(self.path)
            if getattr(trainer, "config_write_error", None):
                trainer.log_event("config_write_failed", error=trainer.config_write_error)

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if self._file is not None:
            self._file.append(row)

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ProgressBar(Callback):
    """A tqdm bar on rank 0 (`logging.progress`): loss and LR per step, val loss lines."""

    def __init__(self):
        self._bar = None

    def on_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            from tqdm import tqdm

            self._bar = tqdm(
                total=trainer.cfg.train.max_steps,
                initial=trainer.step,
                desc="train",
                dynamic_ncols=True,
            )

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if self._bar is None:
            return
        if "loss" in row:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if "val_loss" in row:
            self._bar.write(f"step {row['step']}: val_loss {row['val_loss']:.4f}")

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Wandb(Callback):
    """wandb in the run directory (`logging.wandb`: offline by default, online, disabled)."""

    def __init__(self):
        self._run = None

    def on_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            self._run = _init_wandb(trainer.run_dir, trainer.cfg)

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if self._run is not None and "event" not in row:
            self._run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def default_callbacks(cfg) -> list[Callback]:
    """The built-in callbacks for a job config, in the order they run."""
    callbacks: list[Callback] = [
        Evaluation(cfg.train.eval_interval),
        Checkpointing(cfg.checkpoint.interval),
        MetricsFile(cfg.run_dir),
    ]
    if cfg.logging.progress:
        callbacks.append(ProgressBar())
    if cfg.logging.wandb != "disabled":
        callbacks.append(Wandb())
    return callbacks


def _drop_rows_after(path: Path, step: int) -> None:
    """A run killed after its last checkpoint logged steps that the resumed run repeats; keep
    one row per step by dropping those (and a torn last line) before appending. They are the
    file's tail, normally: it is cut there in place, which needs no free space (a full disk is
    a common reason a run was stopped); rows out of order get the file rewritten."""
    if not path.exists():
        return
    data = path.read_bytes()
    kept, cut, offset = [], None, 0
    for line in data.splitlines(keepends=True):
        start, offset = offset, offset + len(line)
        try:
            row = json.loads(line)
        except ValueError:  # torn JSON, or a line cut inside a UTF-8 character
            row = None
        if not isinstance(row, dict) or row.get("step", 0) > step:
            cut = start if cut is None else cut
            continue
        if cut is not None or not line.endswith(b"\n"):  # not a plain tail to cut
            cut = -1
        kept.append(line if line.endswith(b"\n") else line + b"\n")
    if cut is None:
        return
    if cut >= 0:
        os.truncate(path, cut)
    else:
        write_text_atomic(path, b"".join(kept).decode("utf-8"))


def _init_wandb(run_dir: Path, cfg):
    """wandb in the run directory; offline by default. The run id is kept in run_dir so a
    resumed run continues the same wandb run. The config logged is the resolved job config,
    which holds no secrets (the API key stays in the environment)."""
    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.logging.wandb_project,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        mode=cfg.logging.wandb,
        config=dataclasses.asdict(cfg),
        settings=wandb.Settings(console="off", x_save_requirements=False),
    )
