"""Typed configuration schemas, registered with Hydra's ConfigStore.

Every key a run accepts is a field here, with its type; Hydra merges `conf/train.yaml` and the
command line onto these dataclasses, so a misspelt key or a wrong type stops the run at start.
`opt_train.overrides.check_overrides` runs before Hydra to name the valid keys and choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from hydra.core.config_store import ConfigStore

from data_pipeline.config_limits import OneOf, Range, check_limits
from opt_train.config.sections import (  # noqa: F401 (the sections are this package's API)
    CHECKPOINT_LIMITS,
    DATA_LIMITS,
    DEEPSPEED_LIMITS,
    DOWNSTREAM_LIMITS,
    EXPORT_LIMITS,
    LOGGING_LIMITS,
    LOSS_SCALE_LIMITS,
    MODEL_LIMITS,
    OBSERVE_LIMITS,
    OPTIM_LIMITS,
    PARALLEL_LIMITS,
    PROPORTIONAL,
    STABILITY_LIMITS,
    TRAIN_LIMITS,
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    DownstreamConfig,
    ExportConfig,
    LoggingConfig,
    LossScaleConfig,
    ModelConfig,
    ObserveConfig,
    OptimConfig,
    ParallelConfig,
    ProfileConfig,
    SourceConfig,
    StabilityConfig,
    TrainConfig,
    parse_size,
)

# Choices of the job itself; each section's table is beside it in opt_train.config.sections.
JOB_LIMITS = {
    "precision": OneOf(("auto", "bf16", "fp16", "fp32")),
    "engine": OneOf(("fsdp", "deepspeed")),
}


@dataclass
class JobConfig:
    run_dir: str = "runs/${model.name}"
    precision: str = "auto"  # auto (bf16 where native, else fp32) | bf16 | fp16 | fp32
    engine: str = "fsdp"  # fsdp | deepspeed
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)

    def __post_init__(self) -> None:
        check_limits(self, "", JOB_LIMITS)
        if self.data.seq_len > self.model.max_positions:
            # Learned positions: the table has max_positions rows (+2, OPT's offset) and no more.
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is more than model.max_positions="
                f"{self.model.max_positions}, the longest sequence the model has positions for; "
                "lower data.seq_len (or raise model.max_positions for a model trained from scratch)"
            )
        if self.engine == "deepspeed" and (
            self.parallel.tp != 1 or self.parallel.dp_replicate != 1
        ):
            raise ValueError(
                "engine=deepspeed runs ZeRO data parallelism over all ranks: parallel.tp and "
                f"parallel.dp_replicate must be 1 (got {self.parallel.tp} and "
                f"{self.parallel.dp_replicate}); use engine=fsdp for tensor parallelism or HSDP"
            )
        if self.engine == "deepspeed" and self.parallel.init == "meta":
            raise ValueError(
                "engine=deepspeed builds the whole model on every rank before ZeRO partitions "
                "it, so parallel.init=meta is not available; use engine=fsdp for models whose "
                "fp32 weights do not fit in one host's memory"
            )
        if self.train.batch_tokens % self.data.seq_len:
            raise ValueError(
                f"train.batch_tokens={self.train.batch_tokens} must be a multiple of "
                f"data.seq_len={self.data.seq_len}"
            )
        self._check_stability()

    def _check_stability(self) -> None:
        """A rollback needs a checkpoint from before the spike began still on disk: up to
        `lookback` steps before detection, so ceil(lookback / interval) newer saves may exist
        besides it, and `keep` must hold them all."""
        st, ck = self.stability, self.checkpoint
        if (self.optim.clip_changes or (st.enabled and st.clip_grad_norm)) and (
            self.engine == "deepspeed"
        ):
            raise ValueError(
                "clipping changes (optim.clip_changes, stability.clip_grad_norm) need "
                "engine=fsdp: DeepSpeed clips at the threshold fixed in its config"
            )
        if not st.enabled:
            return
        if ck.interval < 1:
            raise ValueError(
                "stability.enabled=true rolls back to checkpoints: set checkpoint.interval > 0"
            )
        need = 1 + math.ceil(st.lookback() / ck.interval)
        if ck.keep < need:
            raise ValueError(
                f"stability.window={st.window} (nonfinite_steps={st.nonfinite_steps}) looks back "
                f"up to {st.lookback()} steps, so with checkpoint.interval={ck.interval} the "
                f"checkpoint to roll back to is kept only with checkpoint.keep >= {need} "
                f"(got {ck.keep}): raise checkpoint.keep or checkpoint.interval, or lower "
                "stability.window"
            )
        if st.nonfinite_steps > self.train.max_nonfinite_steps:
            raise ValueError(
                f"stability.nonfinite_steps={st.nonfinite_steps} is more than "
                f"train.max_nonfinite_steps={self.train.max_nonfinite_steps}, which stops the run "
                "first"
            )

    def global_batch_samples(self) -> int:
        return self.train.batch_tokens // self.data.seq_len

    def resolve_micro_batch(self, dp_world: int) -> int:
        """`train.micro_batch_size`, or when it is null the largest divisor of this rank's share
        of the global batch that is at most MAX_DERIVED_MICRO_BATCH: the tiny default's 8
        sequences give 8 on one rank, 4 each on two, 2 each on four."""
        if self.train.micro_batch_size is not None:
            return self.train.micro_batch_size
        per_rank = max(1, self.global_batch_samples() // dp_world)
        return max(
            d for d in range(1, min(per_rank, MAX_DERIVED_MICRO_BATCH) + 1) if not per_rank % d
        )

    def grad_accum_steps(self, dp_world: int) -> int:
        """Micro-batches per rank per optimizer step, derived from the global batch."""
        g = self.global_batch_samples()
        if self.train.micro_batch_size is None and g % dp_world:
            raise ValueError(
                f"train.batch_tokens={self.train.batch_tokens} gives {g} sequences of "
                f"data.seq_len={self.data.seq_len} per step, which {dp_world} data-parallel "
                "ranks cannot share equally; change train.batch_tokens or the number of ranks"
            )
        per_step = self.resolve_micro_batch(dp_world) * dp_world
        if g % per_step:
            raise ValueError(
                f"train.batch_tokens={self.train.batch_tokens} gives {g} sequences of "
                f"data.seq_len={self.data.seq_len} per step, not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size} x {dp_world} data-parallel "
                f"ranks = {per_step}; change one of them"
            )
        return g // per_step


# Sequences of a derived micro-batch at most: 8 x 2048 tokens fit OPT-125m..1.3B activations
# on an 80 GB GPU (`python -m opt_train.plan +model=opt-1.3b train.micro_batch_size=8` prints
# the peak); set train.micro_batch_size for anything else.
MAX_DERIVED_MICRO_BATCH = 8


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=JobConfig)


# Every section's table by its key prefix, for code that checks one key outside its section
# (`check_value`, opt_train.overrides).
LIMITS: dict[str, dict[str, Range | OneOf]] = {
    "": JOB_LIMITS,
    "model": MODEL_LIMITS,
    "train": TRAIN_LIMITS,
    "data": DATA_LIMITS,
    "optim": OPTIM_LIMITS,
    "loss_scale": LOSS_SCALE_LIMITS,
    "parallel": PARALLEL_LIMITS,
    "checkpoint": CHECKPOINT_LIMITS,
    "logging": LOGGING_LIMITS,
    "deepspeed": DEEPSPEED_LIMITS,
    "export": EXPORT_LIMITS,
    "stability": STABILITY_LIMITS,
    "observe": OBSERVE_LIMITS,
    "downstream": DOWNSTREAM_LIMITS,
}


def check_value(key: str, value: Any) -> None:
    """`value` checked against the declared limit of `key` (e.g. "parallel.activation_checkpoint"),
    for functions that take one setting as an argument rather than a config."""
    section, _, name = key.rpartition(".")
    check_limits(SimpleNamespace(**{name: value}), section, {name: LIMITS[section][name]})
