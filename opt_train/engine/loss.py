"""The training loss: next-token cross-entropy through the tied output projection, in chunks.

Kept apart from the model (torchtitan's split): the model returns logits, or hands its final
hidden states and the tied output weight to a `head`; the trainer passes `cross_entropy_head`,
through `lm_loss`. It is also where tensor parallelism reaches inside a computation: with a
vocabulary-sharded output projection the softmax statistics are all-reduced across the
tensor-parallel group instead of gathering full-vocabulary logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` without keeping [tokens, vocab] logits.

    Forward walks the tokens in chunks: logits for one chunk (in fp32), the loss, and at once
    the gradients w.r.t. hidden and weight (softmax - onehot); only those are kept. For OPT's
    50,272-word vocabulary the fp32 logits of a micro-batch are otherwise the largest
    activation of the step (8 x 2048 tokens x 50,272 x 4 bytes: 3.3 GB, and as much again for
    their gradient).

    With `group` set, `weight` holds rows [vocab_start, vocab_start + len) of a vocabulary
    split across the ranks of `group` (tensor parallel): max, sum-exp and target logit are
    all-reduced, so no rank ever holds full-vocabulary logits.

    `grad_scale` is the gradient the caller will send back (the fp16 loss scale divided by the
    accumulation steps): the gradients are formed already multiplied by it, so in fp16 they do
    not underflow before backward sees the scale. Backward divides it out again.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, grad_scale, group, vocab_start):
        n, device = hidden.shape[0], hidden.device
        v_local = weight.shape[0]
        rows_per_chunk = min(n, chunk_tokens)
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        w = weight.to(hidden.dtype)
        # One fp32 logits buffer (and one in the compute dtype) serves every chunk: fresh
        # [chunk, vocab] tensors per op cost more in page faults than in arithmetic on CPU.
        buf = _scratch(0, rows_per_chunk * v_local, torch.float32, device)
        low = None
        if hidden.dtype != torch.float32:
            low = _scratch(1, rows_per_chunk * v_local, hidden.dtype, device)
        rows = torch.arange(rows_per_chunk, device=device)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, n, chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            c = h.shape[0]
            y = targets[start : start + c] - vocab_start
            mine = (y >= 0) & (y < v_local)
            y_local = torch.where(mine, y, 0)
            logits = buf[: c * v_local].view(c, v_local)
            if low is None:
                torch.mm(h, w.t(), out=logits)
            else:
                torch.mm(h, w.t(), out=low[: c * v_local].view(c, v_local))
                logits.copy_(low[: c * v_local].view(c, v_local))
            m = logits.amax(dim=-1)
            _all_reduce(m, group, dist.ReduceOp.MAX)
            logits.sub_(m[:, None])
            target_logit = torch.where(mine, logits[rows[:c], y_local], 0.0)
            sumexp = logits.exp_().sum(dim=-1)
            _all_reduce(sumexp, group)
            _all_reduce(target_logit, group)
            total += (torch.log(sumexp) - target_logit).sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / n, times grad_scale
            scale = grad_scale / n
            logits.mul_((scale / sumexp)[:, None])
            logits[rows[:c][mine], y_local[mine]] -= scale
            g = logits
            if low is not None:
                g = low[: c * v_local].view(c, v_local)
                g.copy_(logits)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[start : start + c])
            if g.dtype == torch.float32:
                grad_w.addmm_(g.t(), h)
            else:
                grad_w += (g.t() @ h).float()
        if grad_h is not None:
            _all_reduce(grad_h, group)  # every vocabulary shard contributes to d/d(hidden)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.grad_scale = grad_scale
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        factor = grad_out / ctx.grad_scale
        gh = None if grad_h is None else grad_h * factor.to(grad_h.dtype)
        return gh, (grad_w * factor).to(ctx.weight_dtype), None, None, None, None, None


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat CPU buffer (GPU allocations come from the caching allocator already)."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    key = (slot, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype)
    return buf


def _all_reduce(t: torch.Tensor, group, op=None) -> None:
    if group is not None:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = 2048,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Mean cross-entropy of logits `hidden @ weight.T` against `targets` (all tokens count).

    Under autocast the projection runs in the autocast dtype, as a Linear would. A `weight`
    that is a DTensor sharded over the vocabulary (tensor parallel) takes the vocab-parallel
    path; a sequence-sharded `hidden` is gathered first (it is [tokens, d], small)."""
    group, vocab_start = None, 0
    if isinstance(hidden, DTensor):
        hidden = hidden.full_tensor()
    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        if mesh.ndim != 1 or weight.placements[0] != Shard(0):
            raise ValueError(
                f"vocab-parallel loss needs weight sharded on dim 0, got {weight.placements}"
            )
        group = mesh.get_group()
        vocab_start = mesh.get_local_rank() * weight.to_local().shape[0]
        weight = weight.to_local()
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedCrossEntropy.apply(
            hidden, weight, targets, chunk_tokens, grad_scale, group, vocab_start
        )


def cross_entropy_head(
    targets: torch.Tensor, chunk_tokens: int = 2048, grad_scale: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss as the model's output head (`OPT.forward(input_ids, head=...)`): from the final
    hidden states [batch, seq, width] and the tied output weight, the mean cross-entropy
    against `targets` [batch, seq]."""

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            targets.reshape(-1),
            chunk_tokens,
            grad_scale,
        )

    return head


def lm_loss(
    model: Callable[..., torch.Tensor],
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = 2048,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` (an OPT, or an engine wrapping one) on a batch.

    Goes through the model's `__call__`, so FSDP's and DeepSpeed's forward hooks run.
    `grad_scale` is the factor the caller multiplies the loss by before backward (the fp16 loss
    scale over the accumulation steps); the gradients are formed already scaled by it."""
    return model(input_ids, head=cross_entropy_head(targets, chunk_tokens, grad_scale))
