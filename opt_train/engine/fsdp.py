"""The FSDP2 / one-process engine: the model as `parallelize()` left it, with our optimizer,
clipping and fp16 loss scaler."""

from __future__ import annotations

import math

import torch
from torch import nn

from opt_train.checkpoint.weights import DCPWeights
from opt_train.config import JobConfig
from opt_train.engine.base import StepOutcome, TrainEngine
from opt_train.engine.loss import lm_loss
from opt_train.engine.optim import build_optimizer, clip_grad_norm_, set_lr
from opt_train.engine.precision import DynamicLossScaler, autocast


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
