"""lm-evaluation-harness tasks in the loop (`downstream.tasks`; docs/evaluation.md)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opt_train.checkpoint.weights import capture_rng, restore_rng
from opt_train.config import DownstreamConfig
from opt_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer


class Downstream(Callback):
    """Every `downstream.interval` steps and at `train.max_steps`: the tasks through lm-eval,
    one row `{"step", "downstream/<task>/<metric>": ..., "downstream_time_s"}`.

    The tasks are built at start (their data loaded), so a wrong name, a broken YAML or data
    that cannot load stops the run before its first step. An evaluation leaves the run as it
    found it: the model back in train mode (the harness restores it), and every RNG stream
    (python, numpy, torch, CUDA) restored after lm-eval seeds its own, so dropout masks and the
    data order, hence the loss curve and an exact resume, are those of a run without it."""

    def __init__(self, cfg: DownstreamConfig):
        self.cfg = cfg
        self.lm = None

    def on_start(self, trainer: Trainer) -> None:
        from opt_train.downstream.run import TaskError, load_tasks, make_lm

        try:  # every rank reads the same files, so every rank stops here alike
            load_tasks(self.cfg.tasks, self.cfg.include_path, self.cfg.num_fewshot)
        except TaskError as e:
            raise SystemExit(f"error: downstream.tasks: {e}") from None
        self.lm = make_lm(
            trainer.model,
            trainer.cfg,
            trainer.device,
            trainer.engine.autocast_precision,
            trainer.dp_rank,
            trainer.dims.dp,
            self.cfg.batch_size,
        )

    def post_step(self, trainer: Trainer) -> None:
        every = self.cfg.interval
        if trainer.step == trainer.cfg.train.max_steps or (every and trainer.step % every == 0):
            trainer.log(self.evaluate(trainer))

    def evaluate(self, trainer: Trainer) -> dict:
        """The row of one evaluation (collective: every rank computes its share)."""
        from opt_train.downstream.run import evaluate, metric_rows

        t0 = time.perf_counter()
        rng = capture_rng()
        try:
            results = evaluate(
                self.lm,
                self.cfg.tasks,
                self.cfg.include_path,
                self.cfg.limit,
                self.cfg.num_fewshot,
                bootstrap_iters=0,  # stderr by bootstrap costs more than the scoring here
            )
        finally:
            restore_rng(rng)
        row = {"step": trainer.step, **metric_rows(results)}
        row["downstream_time_s"] = time.perf_counter() - t0
        return row
