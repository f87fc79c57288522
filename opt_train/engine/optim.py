"""AdamW with OPT's settings and the linear warmup / linear decay schedule.

OPT (and metaseq): betas (0.9, 0.95), eps 1e-8, weight decay 0.1; LR rises linearly from 0 over
375M tokens, then falls linearly to 10% of peak at 300B tokens. Token budgets are converted to
optimizer steps with the global batch, so the schedule follows tokens whatever the batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from opt_train.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups, decayed and not. With `weight_decay_on=matrices` biases and LayerNorm
    parameters (every 1-D tensor) are not decayed; with `all` every parameter is, as metaseq did."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if cfg.weight_decay_on == "all" or p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    fused = use_fused_adamw(list(model.parameters()))
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=0.0,  # set every step by the schedule
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        # torch picks foreach only for CUDA tensors; CPU DTensors would take the per-parameter
        # loop, a dozen DTensor dispatches per parameter (the same numbers, several times the
        # CPU: docs/benchmarks.md, "Numbers behind code comments")
        foreach=not fused,
    )


def use_fused_adamw(params: list[torch.Tensor]) -> bool:
    """The fused AdamW kernel (one launch for all parameters of a dtype, the fastest on GPUs)
    for CUDA parameters, DTensors (FSDP2/TP shards) included: DTensor runs the fused op on
    the local shards. On CPU, plain tensors use it too; CPU DTensors take the foreach path
    (`build_optimizer`)."""
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return on_cuda or not any(isinstance(p, DTensor) for p in params)


class LinearWarmupDecay:
    """LR for optimizer step `step` (1-based): linear 0 -> peak over the warmup steps, then
    linear peak -> end_lr_ratio * peak until the decay steps, constant after."""

    def __init__(self, cfg: OptimConfig, batch_tokens: int):
        self.peak = cfg.lr
        self.end = cfg.lr * cfg.end_lr_ratio
        self.warmup_steps = max(1, math.ceil(cfg.warmup_tokens / batch_tokens))
        self.decay_steps = max(self.warmup_steps + 1, math.ceil(cfg.decay_tokens / batch_tokens))

    def __call__(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.peak * step / self.warmup_steps
        if step >= self.decay_steps:
            return self.end
        frac = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        return self.peak + frac * (self.end - self.peak)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> float:
    """Clip the global gradient norm of parameters that may be DTensors on different meshes
    (FSDP's 1-D data-parallel mesh, FSDP x TP's 2-D mesh) or plain tensors; returns the norm.

    torch.nn.utils.clip_grad_norm_ stacks all per-parameter norms at once and fails when they
    live on different meshes ("All operands in aten.stack.default must have the same mesh").
    Here the squared norms are summed per (mesh, placements) group with DTensor arithmetic,
    which knows how each layout splits a tensor (FSDP x TP uses strided shards), turned into
    plain numbers with one reduction per group, and added up.
    """
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else (None, ())
        groups.setdefault(key, []).append(g)
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for group in groups.values():
        sq = torch.stack(torch._foreach_norm(group, 2.0)).double().pow(2).sum()
        total += sq.full_tensor() if isinstance(sq, DTensor) else sq
    norm = total.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for group in groups.values():
            torch._foreach_mul_(
                [g.to_local() if isinstance(g, DTensor) else g for g in group], coef
            )
    return norm
