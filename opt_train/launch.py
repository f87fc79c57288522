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


def run(cfg: DictConfig) -> dict:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    job = to_job_config(cfg)
    from opt_train.trainer import train

    return train(job)
