"""What the training loop drives: one engine interface, and its FSDP2 / one-process implementation.

The trainer (opt_train/trainer.py) runs every optimizer step the same way whatever the engine:

    engine.start_step(lr)
    for inputs, targets in micro_batches:
        loss = engine.forward_backward(inputs, targets, len(micro_batches))
    outcome = engine.optim_step(loss_finite)   # norm, clip, step or an agreed skip, zero grads

`FSDPEngine` (here) runs the model as `parallelize()` left it (FSDP2 x TP, or one plain process)
with our loss scaler, clipping and AdamW; `DeepSpeedEngine` (opt_train/deepspeed_engine.py)
hands the same calls to a DeepSpeed ZeRO engine. Each owns its optimizer, its checkpoint
`Weights` (opt_train/checkpoint.py) and the state it must carry over a restart (`state_dict`).
OLMo-core's TrainModule is the model for this split.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from opt_train.checkpoint import DCPWeights, Weights
from opt_train.config import JobConfig
from opt_train.loss import lm_loss
from opt_train.optim import build_optimizer, clip_grad_norm_, set_lr
from opt_train.precision import DynamicLossScaler, autocast


@dataclass
class StepOutcome:
    """What an optimizer step did; the same on every rank."""

    stepped: bool  # the optimizer step was applied
    grad_norm: float  # before clipping; NaN when not computed or not finite
    loss_scale: float  # the fp16 loss scale this step's backward used (1.0 otherwise)
    # fp16 gradients overflowed: the scaler's business (halve and retry), not a divergence
    overflow: bool


class TrainEngine(ABC):
    """A model, its optimizer and its loss scaling, behind the calls the loop makes.

    `model` is the module the trainer built (hooks, eval mode and export use it), `optimizer`
    the object whose param_groups take the LR, `weights` the checkpoint's model-and-optimizer
    part, `scaler` our fp16 loss scaler (disabled where the engine scales by itself)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    weights: Weights
    scaler: DynamicLossScaler
    # The autocast the engine's forward runs under: FSDP and DeepSpeed cast parameters to the
    # low precision themselves; one process uses autocast.
    autocast_precision: str

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.chunk_tokens = cfg.train.loss_chunk_tokens

    @abstractmethod
    def start_step(self, lr: float) -> None:
        """Before a step's first micro-batch: set the LR, enter train mode."""

    @abstractmethod
    def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, n_micro: int
    ) -> torch.Tensor:
        """Forward and backward of one of the step's `n_micro` micro-batches, the gradient
        being that of the mean loss over them; returns this micro-batch's detached loss."""

    @abstractmethod
    def optim_step(self, loss_finite: bool) -> StepOutcome:
        """After the step's last micro-batch: the gradient norm, clipping and the optimizer
        step, or a skip that every rank makes alike (fp16 overflow, or `loss_finite` false, or
        a non-finite norm); gradients are zero afterwards."""

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of one batch, no gradients (the caller sets eval mode)."""
        with autocast(self.autocast_precision, inputs.device.type):
            return lm_loss(self.model, inputs, targets, self.chunk_tokens).float()

    def state_dict(self) -> dict:
        """Merged into the trainer's state.json (keys kept as they always were)."""
        return {"loss_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["loss_scaler"])


class FSDPEngine(TrainEngine):
    """The model as parallelize() left it (FSDP2, TP, both, or one process), our AdamW, our
    metaseq-style fp16 loss scaler and our clipping (which works across DTensor meshes)."""

    def __init__(self, model: nn.Module, cfg: JobConfig, distributed: bool):
        super().__init__(cfg)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optim)
        self.weights = DCPWeights(model, self.optimizer, cfg.checkpoint.write_threads)
        self.scaler = DynamicLossScaler(cfg.loss_scale, enabled=cfg.precision == "fp16")
        self.autocast_precision = "fp32" if distributed else cfg.precision
        self.clip = cfg.optim.clip_grad_norm

    def start_step(self, lr: float) -> None:
        set_lr(self.optimizer, lr)
        self.model.train()

    def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, n_micro: int
    ) -> torch.Tensor:
        grad_scale = self.scaler.scale / n_micro
        with autocast(self.autocast_precision, inputs.device.type):
            loss = lm_loss(self.model, inputs, targets, self.chunk_tokens, grad_scale)
        (loss * grad_scale).backward()
        return loss.detach()

    def optim_step(self, loss_finite: bool) -> StepOutcome:
        params = [p for p in self.model.parameters() if p.grad is not None]
        overflow = self.scaler.found_overflow(params)  # fp16 only: unscales, agrees over ranks
        loss_scale = self.scaler.scale
        grad_norm = float("nan")
        stepped = False
        if loss_finite and not overflow:
            # The norm is a global reduction, so every rank sees the same value here too.
            grad_norm = clip_grad_norm_(params, self.clip)
            if math.isfinite(grad_norm):
                self.optimizer.step()
                stepped = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update(overflow or not loss_finite)
        return StepOutcome(stepped, grad_norm, loss_scale, overflow)


def build_engine(cfg: JobConfig, model: nn.Module, world: int, accum: int) -> TrainEngine:
    """The engine `cfg.engine` names, around a model already built (and parallelized)."""
    if cfg.engine == "deepspeed":
        from opt_train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, world, accum)
    return FSDPEngine(model, cfg, distributed=world > 1)
