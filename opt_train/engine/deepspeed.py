"""`engine=deepspeed`: DeepSpeed ZeRO stage 1, 2 or 3 from the same job config.

The trainer's loop is the same for both engines: it drives the `TrainEngine` interface of
opt_train/engine/base.py. This module holds its DeepSpeed implementation: DeepSpeed's config,
derived from ours; `DeepSpeedEngine`, whose DeepSpeed engine owns the optimizer step (ZeRO
partitioning, averaging gradients over ranks, clipping, skipping a step whose gradient norm is
NaN/inf); and the checkpoint weights in DeepSpeed's own files.

Choices, for deepspeed 0.19.8 and torch 2.13 on CPU (build times: docs/benchmarks.md):
- The optimizer is our torch AdamW (param groups, betas, eps, weight decay from `optim.*`).
  DeepSpeed's own `"optimizer": {"type": "AdamW"}` would JIT-compile FusedAdam (~100 s on CPU).
- DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at start (~75 s) that serves
  only `inference_all_reduce`; training collectives go through torch.distributed. On CPU the op
  is therefore marked unavailable instead of built.
- DeepSpeed's ZeRO optimizers import its Muon optimizer, whose kernels are decorated with
  `torch.compile`, and decorating imports torch's inductor compiler: ~3 s of CPU per rank at
  start for an optimizer this engine never uses. The kernels are imported here first with the
  compile deferred to their first call (`_import_muon_compiling_lazily`).
- DeepSpeed loads its checkpoint files with `torch.load(weights_only=False)`, which would run
  whatever a file's pickle says. Ours loads them with `weights_only=True`, allowing only the
  DeepSpeed classes those files hold (`ZERO_CHECKPOINT_CLASSES`).
- fp16 uses DeepSpeed's loss scaler set from `loss_scale.*` with metaseq's behaviour (halve on
  every overflow: hysteresis 1). DeepSpeed's scale stops at 1, so our stop rule (the scale would
  fall below `loss_scale.min`) counts the overflows in a row at 1 instead.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from concurrent.futures import Future
from pathlib import Path

import torch

from opt_train.config import JobConfig
from opt_train.engine.base import StepOutcome, TrainEngine
from opt_train.engine.loss import lm_loss
from opt_train.engine.optim import build_optimizer, set_lr
from opt_train.engine.precision import DynamicLossScaler, LossScaleTooSmall
from opt_train.model.dtypes import DTYPES

log = logging.getLogger(__name__)

FORMAT = "opt-train-deepspeed/1"
TAG = "deepspeed"  # the sub-directory of a checkpoint that holds DeepSpeed's files
DS_MIN_LOSS_SCALE = 1  # DeepSpeed's fp16 scale is an integer >= 1


def deepspeed_config(cfg: JobConfig, world: int, accum: int) -> dict:
    """DeepSpeed's config dict for this job: the batch, clipping and precision of ours."""
    if cfg.precision not in DTYPES:  # "auto" would silently enable neither bf16 nor fp16
        raise ValueError(f"resolve precision={cfg.precision!r} first (resolve_precision)")
    fp16 = cfg.precision == "fp16"
    power = math.log2(cfg.loss_scale.init)
    if fp16 and power != int(power):
        raise ValueError(
            f"engine=deepspeed with precision=fp16 needs loss_scale.init to be a power of two "
            f"(DeepSpeed sets it as 2**initial_scale_power), got {cfg.loss_scale.init}"
        )
    zero: dict = {"stage": cfg.deepspeed.stage}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.train.micro_batch_size * accum * world,
        "gradient_clipping": cfg.optim.clip_grad_norm,
        "zero_optimization": zero,
        # Our torch AdamW is not on DeepSpeed's list of tested ZeRO optimizers; it is the
        # same algorithm, and the equality tests against the FSDP engine check it.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {
            "enabled": fp16,
            "initial_scale_power": int(power),
            "loss_scale_window": cfg.loss_scale.window,
            "hysteresis": 1,
            "min_loss_scale": DS_MIN_LOSS_SCALE,
        },
        "steps_per_print": 2**31 - 1,  # our metrics.jsonl and progress bar report the steps
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.offload_optimizer:
        # Pinned host memory needs a GPU; on a CPU-only machine the "offload" is a no-op copy.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # Our torch AdamW instead of DeepSpeedCPUAdam, which would be JIT-compiled.
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def overflows_allowed_at_floor(min_scale: float) -> int:
    """How many fp16 overflows in a row at DeepSpeed's floor scale of 1 end the run: the
    number of halvings metaseq's scaler would make from 1 before falling below `min_scale`."""
    n, scale = 0, float(DS_MIN_LOSS_SCALE)
    while scale >= min_scale:
        scale /= 2.0
        n += 1
    return n


MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"


def _import_muon_compiling_lazily() -> None:
    """Import DeepSpeed's Muon kernels with their `@compiler.compile()` decorators deferring
    `torch.compile` to each function's first call, so that importing them does not import
    torch's inductor. Does nothing where the module is already imported or does not exist."""
    if MUON_MODULE in sys.modules:
        return
    from deepspeed.runtime import compiler

    eager = compiler.compile

    def lazy():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = eager()(fn)
                return compiled(*args, **kwargs)

            return call

        return decorate

    compiler.compile = lazy
    try:
        import deepspeed.runtime.zero.muon.original_muon  # noqa: F401
    except ImportError:
        pass
    finally:
        compiler.compile = eager


class DeepSpeedEngine(TrainEngine):
    """A model and our AdamW inside a DeepSpeed engine. Every rank builds the full model
    first (ZeRO then keeps only its partition), so this engine suits models whose fp32 weights
    fit in one host's memory; beyond that use the FSDP engine with `parallel.init=meta`.

    DeepSpeed's `engine.step()` after the last micro-batch averages gradients over ranks,
    clips, and applies the optimizer step or, when the gradient norm is NaN/inf (as after a NaN
    loss on any rank) or fp16 overflowed, skips it; `optim_step` reads what it did."""

    def __init__(self, model: torch.nn.Module, cfg: JobConfig, world: int, accum: int):
        import deepspeed
        import deepspeed.ops

        super().__init__(cfg)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if not torch.cuda.is_available():
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if cfg.deepspeed.stage == 3:
            # The output projection reads the embedding's weight outside the embedding's own
            # forward; ZeRO-3 gathers it for the root module's forward only when told.
            deepspeed.zero.register_external_parameter(model, model.embed_tokens.weight)
        self.model = model
        _import_muon_compiling_lazily()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, cfg.optim),
            config=deepspeed_config(cfg, world, accum),
        )
        self.engine.checkpoint_engine = _weights_only_checkpoint_engine(self.engine)
        self.weights = DeepSpeedWeights(self.engine)
        # DeepSpeed scales fp16 losses itself (set from the same loss_scale.* keys); ours stays
        # disabled and is kept only so that state.json has the same entries for both engines.
        self.scaler = DynamicLossScaler(cfg.loss_scale, enabled=False)
        self.autocast_precision = "fp32"  # DeepSpeed casts the parameters itself
        self.fp16 = cfg.precision == "fp16"
        self.floor_overflows = 0  # fp16: overflows in a row at the floor scale
        self.step_scale = 1.0

    def loss_scale(self) -> float:
        return float(self.optimizer.loss_scale) if self.fp16 else 1.0

    def start_step(self, lr: float) -> None:
        set_lr(self.optimizer, lr)  # DeepSpeed's optimizer wrapper shares our param_groups
        self.model.train()
        self.step_scale = self.loss_scale()

    def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, n_micro: int
    ) -> torch.Tensor:
        """After the step's last micro-batch, `engine.step()` applies (or skips) the
        optimizer step; on the others it only counts the micro-batch."""
        loss = lm_loss(self.engine, inputs, targets, self.chunk_tokens, self.step_scale / n_micro)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def optim_step(self, loss_finite: bool) -> StepOutcome:
        """Raises LossScaleTooSmall when fp16 keeps overflowing at the floor scale."""
        scale = self.step_scale
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        if self.fp16 and not applied:
            at_floor = scale <= DS_MIN_LOSS_SCALE
            self.floor_overflows = self.floor_overflows + 1 if at_floor else 0
            if self.floor_overflows >= overflows_allowed_at_floor(self.cfg.loss_scale.min):
                raise LossScaleTooSmall(
                    f"fp16 gradients overflowed {self.floor_overflows} steps in a row at "
                    f"DeepSpeed's smallest loss scale ({DS_MIN_LOSS_SCALE}); metaseq's scaler "
                    f"would have fallen below loss_scale.min={self.cfg.loss_scale.min:g}: training "
                    "has diverged. Resume from an earlier checkpoint with a lower LR, skip the bad "
                    "data range, or use precision=bf16."
                )
        elif applied:
            self.floor_overflows = 0
        overflow = self.fp16 and not applied and loss_finite
        return StepOutcome(applied, norm, scale, overflow)


class DeepSpeedWeights:
    """The model and optimizer part of a checkpoint in DeepSpeed's files, under `deepspeed/`
    in the checkpoint directory (opt_train/checkpoint/manager.py adds state, RNG, config and hashes,
    and publishes it atomically). Saves are synchronous: DeepSpeed writes from the training
    thread. They load only at the world size that wrote them; DeepSpeed's universal-checkpoint
    tools convert them for another one."""

    format = FORMAT
    reshards = False

    def __init__(self, engine):
        self.engine = engine

    def write(self, tmp: Path, group, asynchronous: bool) -> Future | None:
        # DeepSpeed also copies its zero_to_fp32.py consolidation script into `tmp`.
        self.engine.save_checkpoint(str(tmp), tag=TAG, client_state={}, save_latest=False)
        return None

    def read(self, path: Path, group) -> None:
        loaded, _ = self.engine.load_checkpoint(
            str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise FileNotFoundError(f"{path / TAG}: DeepSpeed found no checkpoint to load")

    @staticmethod
    def files_of_rank(root: Path, rank: int) -> list[str]:
        """DeepSpeed names a rank's partition files `*zero_pp_rank_{rank}_mp_rank_*`."""
        return sorted(
            f"{TAG}/{p.name}" for p in (root / TAG).glob(f"*zero_pp_rank_{rank}_mp_rank_*")
        )


def zero_checkpoint_classes() -> list:
    """The classes DeepSpeed pickles into its ZeRO checkpoint files besides tensors and
    containers (found with torch.serialization.get_unsafe_globals_in_checkpoint)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def load_weights_only(path: str | Path, map_location=None):
    """torch.load with weights_only=True, allowing DeepSpeed's checkpoint classes: a file that
    names any other global is refused (pickle.UnpicklingError) instead of executed.

    torch's allowlist is process-wide and other libraries add to it on import (megatron-core
    registers pathlib.PosixPath, argparse.Namespace, ...), so it is emptied for the load and
    restored after: only the classes named here are allowed, whatever else was imported."""
    others = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with torch.serialization.safe_globals(zero_checkpoint_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(others)


def _weights_only_checkpoint_engine(engine):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise TypeError(
            f"DeepSpeed chose {type(engine.checkpoint_engine).__name__}; opt-train replaces only "
            "its default TorchCheckpointEngine (remove checkpoint engine settings)"
        )

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    return WeightsOnly(engine._config)
