"""The run's rows in wandb (`logging.wandb`)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from opt_train.train.callbacks.base import Callback
from opt_train.train.metric_rows import flat_row

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer


class Wandb(Callback):
    """wandb in the run directory (`logging.wandb`: offline by default, online, disabled;
    `logging.wandb_project`, `_entity`, `_name`, `_group`, `_tags`).

    Every metric is charted against `trainer/step`, a value of each row, never wandb's own
    `step=`: wandb drops a row whose `step=` is lower than one it has seen, and a rollback
    (callbacks/stability.py) or a resume past the last checkpoint logs a step again. wandb's
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
        if "event" not in row or row["event"] == "goodput":  # goodput rows are curves
            values = {k: v for k, v in flat_row(row).items() if k not in ("step", "event")}
        else:  # an event: 1 under events/<name>, its numbers under events/<name>/
            name = f"events/{row['event']}"
            nums = {f"{name}/{k}": v for k, v in row.items() if type(v) in (int, float)}
            values = {name: 1, **nums}
        self._run.log({self.STEP: row["step"], **values})

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


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
