"""From a composed Hydra config to a running job: logging, typed config, the trainer."""

from __future__ import annotations

import logging
import os
import sys

from omegaconf import DictConfig, OmegaConf

from opt_train.config import JobConfig


def to_job_config(cfg: DictConfig) -> JobConfig:
    """The typed config; validation errors name the key and stop the run before any work."""
    try:
        return OmegaConf.to_object(cfg)
    except Exception as e:  # OmegaConf wraps __post_init__ errors; show the message alone
        cause = e.__cause__ or e
        raise SystemExit(f"error: invalid config: {cause}") from None


def own_run_dir_per_multirun_job(cfg: DictConfig) -> None:
    """Under `python train.py -m ...` (a Hydra sweep) each job trains in `run_dir/<job number>`
    unless the command sets `run_dir` itself: jobs sharing one run_dir would resume from each
    other's checkpoints (the resume guard would then refuse them)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    if any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in hc.overrides.task):
        return
    cfg.run_dir = f"{cfg.run_dir}/{hc.job.num}"


def run(cfg: DictConfig) -> dict:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    own_run_dir_per_multirun_job(cfg)
    job = to_job_config(cfg)
    from opt_train.checkpoint.resume_guard import ResumeRefused
    from opt_train.train.trainer import train

    try:
        return train(job)
    except ResumeRefused as e:  # a config mistake, not a crash: the message alone
        raise SystemExit(f"error: {e}") from None
