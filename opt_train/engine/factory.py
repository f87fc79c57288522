"""The engine a config names."""

from __future__ import annotations

from torch import nn

from opt_train.config import JobConfig
from opt_train.engine.base import TrainEngine
from opt_train.engine.fsdp import FSDPEngine


def build_engine(cfg: JobConfig, model: nn.Module, world: int, accum: int) -> TrainEngine:
    """The engine `cfg.engine` names, around a model already built (and parallelized)."""
    if cfg.engine == "deepspeed":
        # deferred: importing deepspeed costs seconds and is needed only for engine=deepspeed
        from opt_train.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, world, accum)
    return FSDPEngine(model, cfg, distributed=world > 1)
