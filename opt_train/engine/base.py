"""What the training loop drives: the engine interface every engine implements.

The trainer (opt_train/train/trainer.py) runs every optimizer step the same way whatever the engine:

    engine.start_step(lr)
    for inputs, targets in micro_batches:
        loss = engine.forward_backward(inputs, targets, len(micro_batches))
    outcome = engine.optim_step(loss_finite)   # norm, clip, step or an agreed skip, zero grads

`FSDPEngine` (opt_train/engine/fsdp.py) runs the model as `parallelize()` left it (FSDP2 x TP,
or one plain process) with our loss scaler, clipping and AdamW; `DeepSpeedEngine`
(opt_train/engine/deepspeed.py) hands the same calls to a DeepSpeed ZeRO engine. Each owns its
optimizer, its checkpoint `Weights` (opt_train/checkpoint/weights.py) and the state it must
carry over a restart (`state_dict`).
OLMo-core's TrainModule is the model for this split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from opt_train.checkpoint.weights import Weights
from opt_train.config import JobConfig
from opt_train.engine.loss import lm_loss
from opt_train.engine.precision import DynamicLossScaler, autocast


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
        """Merged into the trainer's state.json, top level: checkpoints already written read
        `loss_scaler` from there."""
        return {"loss_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["loss_scaler"])
