"""The sections of the training job's config (`model`, `train`, `data`, ...), one dataclass
each with the table of its keys' allowed values; `opt_train.config.JobConfig` holds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from data_pipeline.config_limits import (
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    OneOf,
    Range,
    check_limits,
)

# The allowed values of every numeric key and every choice, one table per section, checked by
# data_pipeline.config_limits.check_limits from each section's __post_init__ (so before anything
# is built; docs/training.md, "Configuration") and, for choices, by `check_overrides` on the
# command line. Code that branches on a choice reads its values here. Cross-key rules stay in
# __post_init__.
MODEL_LIMITS = {
    "vocab_size": AT_LEAST_1,
    "n_layers": AT_LEAST_1,
    "n_heads": AT_LEAST_1,
    "d_model": AT_LEAST_1,
    "ffn_dim": Range(1, null=True),
    "max_positions": AT_LEAST_1,
    "word_embed_proj_dim": Range(1, null=True),
    "dropout": FRACTION,
    "attention_dropout": FRACTION,
    "init_std": POSITIVE,
}
TRAIN_LIMITS = {
    "max_steps": AT_LEAST_1,  # 0 or less would exit 0 having trained nothing
    "seed": Range(0, 2**63 - 1),  # numpy and torch generators take non-negative seeds
    "micro_batch_size": Range(1, null=True),
    "batch_tokens": AT_LEAST_1,
    "eval_interval": NON_NEGATIVE,
    "eval_batches": AT_LEAST_1,
    "loss_chunk_tokens": AT_LEAST_1,
    "device": OneOf(("auto", "cpu", "cuda")),
    "num_threads": Range(1, null=True),
    "max_nonfinite_steps": AT_LEAST_1,
}
DATA_LIMITS = {"exhaust": OneOf(("repeat", "stop")), "seq_len": AT_LEAST_1,
               "validation_fraction": FRACTION}  # fmt: skip
OPTIM_LIMITS = {
    "lr": POSITIVE,  # a negative LR climbs the loss; NaN would only show after steps
    "beta1": FRACTION,
    "beta2": FRACTION,
    "eps": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "weight_decay_on": OneOf(("matrices", "all")),
    "warmup_tokens": NON_NEGATIVE,
    "decay_tokens": NON_NEGATIVE,
    "end_lr_ratio": Range(0, 1),
    "clip_grad_norm": NON_NEGATIVE,
}
LOSS_SCALE_LIMITS = {"init": POSITIVE, "window": AT_LEAST_1, "min": POSITIVE}
PARALLEL_LIMITS = {
    "tp": AT_LEAST_1,
    "dp_shard": Range(1, also=(-1,)),
    "dp_replicate": AT_LEAST_1,
    "activation_checkpoint": OneOf(("off", "full", "selective")),
    "compile": OneOf(("auto", "on", "off")),
    "init": OneOf(("auto", "full", "meta")),
    "timeout_s": POSITIVE,
}
CHECKPOINT_LIMITS = {
    "interval": NON_NEGATIVE,
    "keep": AT_LEAST_1,
    "keep_every": NON_NEGATIVE,
    "write_threads": AT_LEAST_1,
    "debug_delay_s": NON_NEGATIVE,
    "debug_gate_timeout_s": POSITIVE,
    "max_failures": NON_NEGATIVE,
}
LOGGING_LIMITS = {
    "wandb": OneOf(("offline", "online", "disabled")),
    "console": OneOf(("auto", "bar", "lines")),
    "interval": AT_LEAST_1,
    "peak_tflops": Range(0, lo_open=True, null=True),
    "activation_norm_interval": NON_NEGATIVE,
}
DEEPSPEED_LIMITS = {"stage": OneOf((1, 2, 3))}
EXPORT_LIMITS = {"dtype": OneOf(("fp32", "bf16", "fp16"))}
DOWNSTREAM_LIMITS = {
    "interval": NON_NEGATIVE,
    "batch_size": AT_LEAST_1,
    "limit": Range(0, lo_open=True, null=True),
    "num_fewshot": Range(0, null=True),
}
STABILITY_LIMITS = {
    "window": AT_LEAST_1,
    "loss_factor": Range(1, lo_open=True, also=(0,)),  # 0: off; 1 or less flags every step
    "grad_factor": NON_NEGATIVE,
    "nonfinite_steps": NON_NEGATIVE,
    "lr_factor": POSITIVE,
    "lr_steps": NON_NEGATIVE,
    "clip_grad_norm": NON_NEGATIVE,
    "clip_steps": NON_NEGATIVE,
    "max_rollbacks": NON_NEGATIVE,
    "window_steps": AT_LEAST_1,
}
OBSERVE_LIMITS = {"straggler_factor": Range(1, lo_open=True), "straggler_intervals": AT_LEAST_1}


@dataclass
class ModelConfig:
    """OPT decoder shape. Defaults are OPT's facts except the (tiny) size."""

    name: str = "opt-tiny"
    vocab_size: int = 50272  # 50,265 padded to a multiple of 8
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 128
    ffn_dim: Optional[int] = None  # None: 4 x d_model
    max_positions: int = 2048
    word_embed_proj_dim: Optional[int] = None  # 350m: 512 with project_in/out; None: d_model
    pre_layer_norm: bool = True  # False for 350m: post-LN and no final LayerNorm
    dropout: float = 0.1
    attention_dropout: float = 0.1
    init_std: float = 0.006
    # An HF OPT directory (config.json + *.safetensors) whose weights replace the random init
    # of a fresh run (continued pretraining, fine-tuning); its shapes must match the keys
    # above. A resumed run loads its checkpoint instead. opt_train/model/init_from.py.
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        # Derived sizes are properties, not filled in here: OmegaConf builds the schema from
        # defaults first, and a value filled in then would survive a later d_model override.
        check_limits(self, "model", MODEL_LIMITS)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn(self) -> int:
        return self.ffn_dim or 4 * self.d_model

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (and the tied output projection)."""
        return self.word_embed_proj_dim or self.d_model


@dataclass
class TrainConfig:
    max_steps: int = 200
    seed: int = 0
    # Sequences per forward/backward on each data-parallel rank. None: derived from the global
    # batch and the number of data-parallel ranks (`JobConfig.resolve_micro_batch`), so one
    # config runs at any world size that divides the batch.
    micro_batch_size: Optional[int] = None
    batch_tokens: int = 1024  # global tokens per optimizer step; accumulation is derived
    eval_interval: int = 50  # steps; 0 disables validation
    eval_batches: int = 4  # micro-batches of the validation split per evaluation
    loss_chunk_tokens: int = 2048  # the loss materialises logits for this many tokens at once
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = None  # torch intra-op threads on CPU; None leaves torch's default
    # A step whose loss (or gradient norm) is NaN/inf is skipped on every rank and counted
    # (metrics `nonfinite_skips`); this many in a row stop the run with an error.
    max_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        check_limits(self, "train", TRAIN_LIMITS)


PROPORTIONAL = "proportional"  # data.sources[].weight: the source's share of train tokens


@dataclass
class SourceConfig:
    """One shard set of a training mixture (`data.sources`)."""

    name: str = "???"  # its metrics keys: tokens_by_source[<name>], val_loss/<name>
    path: str = "???"  # a token shard directory
    # Its share of training tokens, relative to the other sources' weights; or "proportional"
    # (on every source): its share is its train split's token count (metaseq's default).
    weight: Union[float, int, str] = 1.0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name != self.name.strip():
            raise ValueError(
                f"data.sources: name {self.name!r} must be non-empty, without '/' or "
                "surrounding spaces (it becomes the metrics key val_loss/<name>)"
            )
        w = self.weight
        if w == PROPORTIONAL:
            return
        number = isinstance(w, (int, float)) and not isinstance(w, bool)
        if not (number and math.isfinite(w) and w > 0):
            raise ValueError(
                f"data.sources: weight of {self.name!r} must be a positive number or "
                f"{PROPORTIONAL!r}, got {w!r}"
            )


@dataclass
class DataConfig:
    path: Optional[str] = None  # shards, or datatrove/Megatron/HF token data; None: tiny corpus
    # A train-time mixture [{name, path, weight}, ...] (docs/training.md); or `path`, not both.
    sources: list[SourceConfig] = field(default_factory=list)
    exhaust: str = "repeat"  # a used-up source: repeat (reshuffled) | stop (end the run)
    seq_len: int = 128
    cache_dir: str = "~/.cache/opt-train"  # where the embedded corpus is built once
    # [[first, last], ...]: optimizer steps (1-based, inclusive) of the original run whose global
    # batches are never trained on. Replays a divergence past bad data: resume from a checkpoint
    # before `first` and the next step takes the batch the original step `last + 1` took.
    skip_steps: list[list[int]] = field(default_factory=list)
    # Re-hash every shard file against its manifest's sha256 at start-up (a read of all the
    # data: minutes for hundreds of GB), naming the first file whose bytes changed.
    verify: bool = False
    tokenizer: Optional[str] = None  # foreign token data's: gpt2 | opt | dir (data-pipeline.md)
    validation_fraction: float = 0.001  # foreign data's held-out share (formats/split_rule.py)

    def __post_init__(self) -> None:
        if self.path and self.sources:
            raise ValueError(
                "data.path and data.sources are both set: data.path is the one-source "
                "shorthand; list that directory among data.sources instead"
            )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: names must be unique, got {names}")
        prop = [s.name for s in self.sources if s.weight == PROPORTIONAL]
        if prop and len(prop) != len(self.sources):
            numeric = {s.name: s.weight for s in self.sources if s.weight != PROPORTIONAL}
            raise ValueError(
                f"data.sources: weight {PROPORTIONAL!r} on {prop} but numbers on {numeric}: a "
                "proportional share has no scale to compare a number with; give every source "
                f"weight: {PROPORTIONAL} or every source a number"
            )
        check_limits(self, "data", DATA_LIMITS)
        for r in self.skip_steps:
            if len(r) != 2 or not 1 <= r[0] <= r[1]:
                raise ValueError(
                    f"data.skip_steps entries must be [first, last] with 1 <= first <= last, "
                    f"got {list(r)}"
                )


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # "matrices": decay weight matrices and embeddings, not biases or LayerNorm (common practice);
    # "all": every parameter, as metaseq's fairseq-derived Adam did (no parameter groups).
    weight_decay_on: str = "matrices"
    warmup_tokens: int = 375_000_000
    decay_tokens: int = 300_000_000_000
    end_lr_ratio: float = 0.1
    clip_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    # Given by hand (or replayed from a spike recovery's rollback row): [[first, last, factor]]
    # multiplies the LR of optimizer steps first..last (inclusive; factors of overlapping
    # entries multiply); [[first, last, max_norm]] clips those steps at max_norm instead.
    # (Any: OmegaConf would refuse the whole steps in a list of floats.)
    lr_changes: list[Any] = field(default_factory=list)
    clip_changes: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_limits(self, "optim", OPTIM_LIMITS)
        for key in ("lr_changes", "clip_changes"):
            for r in getattr(self, key):
                if (
                    not isinstance(r, (list, tuple))
                    or len(r) != 3
                    or r[0] != int(r[0])
                    or r[1] != int(r[1])
                    or not 1 <= r[0] <= r[1]
                ):
                    raise ValueError(
                        f"optim.{key} entries must be [first, last, value] with whole steps "
                        f"1 <= first <= last, got {list(r)}"
                    )
                if not r[2] > 0:
                    raise ValueError(f"optim.{key}: the value must be > 0, got {list(r)}")


@dataclass
class LossScaleConfig:
    """fp16 dynamic loss scaling, metaseq's semantics."""

    init: float = 4.0
    window: int = 256  # overflow-free steps before the scale doubles
    min: float = 2.0**-5  # below this the run stops

    def __post_init__(self) -> None:
        check_limits(self, "loss_scale", LOSS_SCALE_LIMITS)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree (Megatron-style, within a node)
    dp_shard: int = -1  # FSDP degree; -1: the rest of the world
    dp_replicate: int = 1  # HSDP replicas of the FSDP group
    activation_checkpoint: str = "off"  # off | full | selective
    compile: str = "auto"  # auto (on for CUDA, off on CPU) | on | off
    init: str = "auto"  # auto (meta above 2 GiB of fp32 weights) | full | meta
    timeout_s: float = 600.0  # a collective waiting longer than this fails with an error

    def __post_init__(self) -> None:
        check_limits(self, "parallel", PARALLEL_LIMITS)


@dataclass
class CheckpointConfig:
    """Sharded DCP checkpoints under run_dir/checkpoints (docs/fault-tolerance.md)."""

    interval: int = 100  # steps; 0 saves only at the end
    keep: int = 2  # newest complete checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    # Write in the background while training continues (the weights are first copied to CPU
    # memory); the next save and the end of the run wait for it. Saves on a preemption signal
    # are always synchronous.
    async_save: bool = True
    # Files (and writer threads) per rank: DCP writes scale with threads (docs/benchmarks.md).
    write_threads: int = 4
    debug_delay_s: float = 0.0  # test hook: sleep this long before a save becomes visible
    # Test hook: a directory; a save then waits, before it becomes visible, until the test
    # creates `<debug_gate>/step_N` (its checkpoint's name), at most debug_gate_timeout_s, after
    # which the save fails. A test holds a save in flight exactly as long as it needs.
    debug_gate: Optional[str] = None
    debug_gate_timeout_s: float = 300.0
    # Config keys (or groups: "optim") that a resume may change from the checkpoint's config;
    # model shape and data keys can never change (opt_train/checkpoint/resume_guard.py).
    allow_changes: list[str] = field(default_factory=list)
    # Failed saves in a row (disk full, EIO, quota) after which the run stops with exit status
    # 86 (opt_train.checkpoint.manager.EXIT_CHECKPOINT_FAILED); 0: never stop for it.
    max_failures: int = 3

    def __post_init__(self) -> None:
        check_limits(self, "checkpoint", CHECKPOINT_LIMITS)


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "opt-train"
    wandb_entity: Optional[str] = None  # None: the API key's default entity
    wandb_name: Optional[str] = None  # None: wandb picks a name
    wandb_group: Optional[str] = None
    wandb_tags: list[str] = field(default_factory=list)
    # Console output on rank 0: a progress bar when stdout is a terminal, plain lines every
    # `interval` steps when it is not (a Slurm log); `console` forces one or the other.
    progress: bool = True
    console: str = "auto"  # auto | bar | lines
    interval: int = 10  # steps between console lines
    tensorboard: bool = False  # scalars under run_dir/tensorboard/ (rank 0)
    peak_tflops: Optional[float] = None  # per device, for MFU; None: known GPUs or measured on CPU
    # Steps between logs of `act_rms`, the RMS of the final hidden states (a rising value is an
    # early sign of divergence); 0: never.
    activation_norm_interval: int = 10

    def __post_init__(self) -> None:
        check_limits(self, "logging", LOGGING_LIMITS)


@dataclass
class ProfileConfig:
    """torch.profiler over a window of steps (docs/training.md, "Profiling")."""

    enabled: bool = False
    steps: list[int] = field(default_factory=lambda: [3, 4])  # [first, last], 1-based, inclusive
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that record
    # CUDA only: also record the allocator's history over the window and dump
    # torch.cuda.memory._snapshot() (open it at pytorch.org/memory_viz).
    memory_snapshot: bool = False
    record_shapes: bool = False  # input shapes per op (larger traces)
    with_stack: bool = False  # Python stacks per op (much larger traces, slower)

    def __post_init__(self) -> None:
        if len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]:
            raise ValueError(
                f"profile.steps must be [first, last] with 1 <= first <= last, got "
                f"{list(self.steps)}"
            )


@dataclass
class StabilityConfig:
    """Automatic loss-spike recovery (opt_train/train/callbacks/stability.py,
    docs/fault-tolerance.md): detect a spike, roll back to the newest checkpoint from before it
    began, skip the data read since, optionally lower the LR and the clipping threshold for a
    while, go on."""

    enabled: bool = False
    window: int = 50  # steps in the baseline (their median) and the most a spike looks back
    loss_factor: float = 2.0  # a loss above median x this is a spike; 0: not checked
    grad_factor: float = 0.0  # a gradient norm above median x this is a spike; 0: not checked
    nonfinite_steps: int = 3  # this many NaN/inf steps in a row are a spike; 0: not checked
    lr_factor: float = 1.0  # after a rollback the LR is multiplied by this ...
    lr_steps: int = 0  # ... for this many steps (0: LR unchanged)
    clip_grad_norm: float = 0.0  # after a rollback clip at this instead (0: unchanged) ...
    clip_steps: int = 0  # ... for this many steps
    max_rollbacks: int = 3  # more rollbacks than this within window_steps stop the run
    window_steps: int = 1000

    def __post_init__(self) -> None:
        check_limits(self, "stability", STABILITY_LIMITS)
        if (self.clip_grad_norm > 0) != (self.clip_steps > 0):
            raise ValueError(
                "stability.clip_grad_norm (> 0) and stability.clip_steps (> 0) go together, "
                f"got {self.clip_grad_norm} and {self.clip_steps}"
            )

    def lookback(self) -> int:
        """How many steps before the detecting step a spike may have begun."""
        return max(self.window, self.nonfinite_steps - 1)


@dataclass
class ObserveConfig:
    """Per-rank phase timing, stragglers and named hangs (docs/observability.md)."""

    timing: bool = True  # phase times of every rank, gathered every logging.interval steps
    straggler_factor: float = 1.5  # a rank computing longer than the others' median x this ...
    straggler_intervals: int = 3  # ... for this many intervals in a row gets a straggler row
    # Heartbeats in the rendezvous store and a watchdog on rank 0: a collective stuck near
    # parallel.timeout_s ends the run with a hang row and status 89 (opt_train/train/heartbeat.py).
    heartbeat: bool = True

    def __post_init__(self) -> None:
        check_limits(self, "observe", OBSERVE_LIMITS)


@dataclass
class DeepSpeedConfig:
    """`engine=deepspeed` settings (docs/deepspeed.md); batch, precision, clipping and the
    optimizer come from the rest of the config, as for the FSDP engine."""

    stage: int = 1  # ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters partitioned
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step in host memory

    def __post_init__(self) -> None:
        check_limits(self, "deepspeed", DEEPSPEED_LIMITS)


@dataclass
class ExportConfig:
    """`python -m opt_train.hf RUN OUT [export.KEY=VALUE ...]` (the run's values are defaults)."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16: the dtype of the exported weights
    # Largest safetensors file; above it the weights are split into model-0000N-of-0000M
    # files with model.safetensors.index.json, as transformers writes them. 1000-based units
    # like transformers' ("5GB" = 5e9 bytes); "GiB" and "MiB" are 1024-based.
    max_shard_size: str = "5GB"

    def __post_init__(self) -> None:
        check_limits(self, "export", EXPORT_LIMITS)
        parse_size(self.max_shard_size)  # raises naming the key


@dataclass
class DownstreamConfig:
    """lm-evaluation-harness tasks in the loop (docs/evaluation.md); no tasks: off."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task or group names
    include_path: Optional[str] = None  # a directory of extra task YAMLs
    interval: int = 0  # steps between evaluations (and at the final step); 0: final step only
    limit: Optional[float] = None  # documents per task (a fraction if < 1); None: all
    num_fewshot: Optional[int] = None  # None: each task's own
    batch_size: int = 16  # sequences per forward

    def __post_init__(self) -> None:
        check_limits(self, "downstream", DOWNSTREAM_LIMITS)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, 1000 -> 1000."""
    s = str(text).strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value <= 0:
        raise ValueError(
            f"export.max_shard_size must be a positive size such as 5GB or 512MiB, got {text!r}"
        )
    return int(value * _SIZE_UNITS[unit])
