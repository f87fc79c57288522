"""Side concerns of a run as callbacks: metrics.jsonl, wandb, TensorBoard, evaluation and
checkpoint cadence (the console is in opt_train/train/callbacks/console.py, the profiler in
opt_train/train/callbacks/profiling.py). The loop in opt_train/train/trainer.py calls the hooks; each callback keeps its
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

from opt_train.train.run_files import JsonlAppender, row_step, write_text_atomic

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer

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
        if self.interval and trainer.val_sets and trainer.step % self.interval == 0:
            trainer.run_evaluation()


class Checkpointing(Callback):
    """Saves every `checkpoint.interval` steps, at the end of the run, and (blocking) when
    every rank agreed on a preemption; the final save is on disk before the run reports
    success.

    A failed save (opt_train/checkpoint/manager.py) becomes a `checkpoint_failed` event row at the
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
            from opt_train.checkpoint.manager import CheckpointSaveFailed

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
            # Whole lines only; a failed write is reported and retried (opt_train/train/run_files.py).
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

    def rewind(self, step: int) -> None:
        """Drop the rows after `step`: a rollback (opt_train/train/callbacks/stability.py) replays those steps."""
        if self._file is not None:
            self._file.close()
            _drop_rows_after(self.path, step)
            self._file = JsonlAppender(self.path)


class Wandb(Callback):
    """wandb in the run directory (`logging.wandb`: offline by default, online, disabled;
    `logging.wandb_project`, `_entity`, `_name`, `_group`, `_tags`).

    Every metric is charted against `trainer/step`, a value of each row, never wandb's own
    `step=`: wandb drops a row whose `step=` is lower than one it has seen, and a rollback
    (opt_train/train/callbacks/stability.py) or a resume past the last checkpoint logs a step again. wandb's
    internal `_step` counts the rows; the replayed steps are kept as rows of their own."""

    STEP = "trainer/step"

    def __init__(self):
        self._run = None

    def on_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            self._run = _init_wandb(trainer.run_dir, trainer.cfg)
            self._run.define_metric(self.STEP)
            self._run.define_metric("*", step_metric=self.STEP, step_sync=True)

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if self._run is None:
            return
        if "event" not in row:
            values = {k: v for k, v in flat_row(row).items() if k != "step"}
        else:  # an event: 1 under events/<name>, its numbers under events/<name>/
            name = f"events/{row['event']}"
            nums = {f"{name}/{k}": v for k, v in row.items() if type(v) in (int, float)}
            values = {name: 1, **nums}
        self._run.log({self.STEP: row["step"], **values})

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class TensorBoard(Callback):
    """Scalars under `run_dir/tensorboard/` (`logging.tensorboard`), written by rank 0, with the
    names of metrics.jsonl (a nested dict such as `tokens_by_source` as `tokens_by_source/<name>`);
    event rows become text entries under `events`."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "tensorboard"
        self._writer = None

    def on_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run hides what a killed run wrote after its checkpoint (TensorBoard's
            # purge_step), as MetricsFile drops those rows.
            purge = trainer.step + 1 if trainer.step else None
            self._writer = SummaryWriter(str(self.dir), purge_step=purge)

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if self._writer is None:
            return
        step = row["step"]
        if "event" in row:
            self._writer.add_text("events", json.dumps(row), step)
            return
        for name, value in flat_row(row).items():
            if name != "step" and isinstance(value, (int, float)):  # bool too (skipped: 0/1)
                self._writer.add_scalar(name, float(value), step)

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def default_callbacks(cfg) -> list[Callback]:
    """The built-in callbacks for a job config, in the order they run."""
    callbacks: list[Callback] = [
        Evaluation(cfg.train.eval_interval),
        Checkpointing(cfg.checkpoint.interval),
        MetricsFile(cfg.run_dir),
    ]
    if cfg.data.sources:
        from opt_train.data.mixture import SourceTokens

        callbacks.append(SourceTokens())
    if cfg.logging.progress:
        from opt_train.train.callbacks.console import console_callback

        callbacks.append(console_callback(cfg))
    if cfg.logging.wandb != "disabled":
        callbacks.append(Wandb())
    if cfg.logging.tensorboard:
        callbacks.append(TensorBoard(cfg.run_dir))
    if cfg.profile.enabled:
        from opt_train.train.callbacks.profiling import Profiler

        callbacks.append(Profiler(cfg.run_dir, cfg.profile))
    from opt_train.train.callbacks.stability import Stability  # it subclasses Callback

    if Stability.wanted(cfg):
        callbacks.append(Stability(cfg))
    return callbacks


def flat_row(row: dict) -> dict:
    """A row with nested dicts flattened to "outer/inner" keys (`tokens_by_source` becomes
    `tokens_by_source/<name>`), for sinks that take one scalar per key."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}/{ik}": iv for ik, iv in flat_row(v).items()})
        else:
            out[k] = v
    return out


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
        if isinstance(row, dict) and row_step(row) is None:
            # A row not written by the run (a hand edit, another tool): kept as it is.
            log.warning(
                "%s: a row with step %r, not an integer: kept, skipped by readers",
                path,
                row.get("step"),
            )
        elif not isinstance(row, dict) or row_step(row) > step:
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
    lc = cfg.logging
    return wandb.init(
        project=lc.wandb_project,
        entity=lc.wandb_entity,
        name=lc.wandb_name,
        group=lc.wandb_group,
        tags=list(lc.wandb_tags) or None,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        mode=cfg.logging.wandb,
        config=dataclasses.asdict(cfg),
        settings=wandb.Settings(console="off", x_save_requirements=False),
    )
