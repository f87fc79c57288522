"""The built-in callbacks of a job, in the order they run."""

from __future__ import annotations

from opt_train.config import JobConfig
from opt_train.train.callbacks.base import Callback
from opt_train.train.callbacks.checkpointing import Checkpointing
from opt_train.train.callbacks.console import console_callback
from opt_train.train.callbacks.downstream import Downstream
from opt_train.train.callbacks.evaluation import Evaluation
from opt_train.train.callbacks.goodput import Goodput
from opt_train.train.callbacks.metrics_file import MetricsFile
from opt_train.train.callbacks.mixture import SourceTokens
from opt_train.train.callbacks.observe import Observe
from opt_train.train.callbacks.profiling import Profiler
from opt_train.train.callbacks.stability import Stability
from opt_train.train.callbacks.tensorboard import TensorBoard
from opt_train.train.callbacks.wandb import Wandb


def default_callbacks(cfg: JobConfig) -> list[Callback]:
    """The built-in callbacks for a job config, in the order they run: Goodput first (it
    brackets the others' work), then Observe (on a hung collective its on_close writes the hang
    row while the sinks are still open), the file sinks before Stability, so that metrics.jsonl
    is open when it writes."""
    ob = cfg.observe
    callbacks: list[Callback] = [
        Goodput(),
        Observe(ob.timing, ob.heartbeat, ob.straggler_factor, ob.straggler_intervals),
        Evaluation(cfg.train.eval_interval),
        Checkpointing(cfg.checkpoint.interval),
        MetricsFile(cfg.run_dir),
    ]
    if cfg.downstream.tasks:
        # before Checkpointing: a kill during the evaluation resumes from before its step,
        # which then runs (and is evaluated) again
        callbacks.insert(1, Downstream(cfg.downstream))
    if cfg.data.sources:
        callbacks.append(SourceTokens())
    if cfg.logging.progress:
        callbacks.append(console_callback(cfg))
    if cfg.logging.wandb != "disabled":
        callbacks.append(Wandb())
    if cfg.logging.tensorboard:
        callbacks.append(TensorBoard(cfg.run_dir))
    if cfg.profile.enabled:
        callbacks.append(Profiler(cfg.run_dir, cfg.profile))
    if Stability.wanted(cfg):
        callbacks.append(Stability(cfg))
    return callbacks
