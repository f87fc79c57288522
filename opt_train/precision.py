"""Mixed precision: autocast per `precision`, and fp16's dynamic loss scaler.

bf16 and fp16 keep fp32 master weights (the parameters) and run matmuls in the low precision
under autocast. fp16 needs loss scaling; we follow metaseq: start at 4, double after 256 steps
without overflow, on overflow skip the step and halve, and stop when the scale falls below
2^-5 (at that point training has diverged and more halving only hides it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from opt_train.config import LossScaleConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LossScaleTooSmall(FloatingPointError):
    """The fp16 loss scale fell below its minimum: the run has diverged."""


def autocast(precision: str, device_type: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision])


class DynamicLossScaler:
    """metaseq-style dynamic loss scaling. Disabled (scale 1, never skips) unless fp16."""

    def __init__(self, cfg: LossScaleConfig, enabled: bool):
        self.enabled = enabled
        self.window = cfg.window
        self.min_scale = cfg.min
        self.scale = cfg.init if enabled else 1.0
        self.good_steps = 0  # overflow-free steps since the last change of scale

    def found_overflow(self, params, group=None) -> bool:
        """Unscale gradients in place and report whether any is inf/NaN on any rank, so every
        rank skips the same step."""
        if not self.enabled:
            return False
        grads = [p.grad for p in params if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        device = grads[0].device if grads else torch.device("cpu")
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=device)
        for dtype_grads in _by_dtype(grads):
            torch._amp_foreach_non_finite_check_and_unscale_(dtype_grads, found, inv)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        return bool(found.item())

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale /= 2.0
            self.good_steps = 0
            if self.scale < self.min_scale:
                raise LossScaleTooSmall(
                    f"fp16 loss scale fell to {self.scale:g}, below loss_scale.min="
                    f"{self.min_scale:g}: gradients overflow at every scale, so training has "
                    "diverged. Resume from an earlier checkpoint with a lower LR, skip the bad "
                    "data range, or use precision=bf16."
                )
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        if state["enabled"] == self.enabled:
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())
