"""Dropout whose random bits are drawn in bulk, for plain CPU tensors.

Why: on CPU, `F.dropout` draws one Bernoulli sample per element (`bernoulli_`), and OPT's
attention dropout masks [batch, heads, T, T] probabilities in every layer: for OPT-125m at
micro-batch 4 x 256 tokens that is 3.1M elements per layer, a visible share of a bf16 CPU step
(docs/benchmarks.md, "Numbers behind code comments"). Here `random_` fills 64-bit words from
the generator (mt19937 produces 64 bits at a time), each word gives four 16-bit lanes, and an
element is kept when its lane is below a threshold: the same mask from a quarter of the draws.

Semantics kept from `F.dropout`:
- The bits come from torch's default CPU generator, so `torch.manual_seed` fixes the masks and
  `torch.get_rng_state`/`set_rng_state` replays them: a resumed run, and activation
  checkpointing's recomputation (`preserve_rng_state`), see the same masks. `random_` runs
  serially, so the mask does not depend on the thread count. (The masks are not the ones
  `F.dropout` draws for the same seed.)
- Kept elements are scaled so that the expectation is the input. The keep probability is the
  multiple of 2^-16 nearest 1 - p (off by at most 2^-17, ~8e-6), and the scale is the inverse
  of that exact probability, so the output stays unbiased.
- The mask is kept for backward in the input's dtype, already scaled, as CPU `F.dropout` keeps
  it (the memory planner counts it so); backward is then one multiply.

CUDA tensors, DTensors and code being traced by torch.compile keep `F.dropout` (fused kernels
there; tensor-parallel and compiled paths unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

_LANES = 65536  # values of one 16-bit lane


def keep_threshold(p: float) -> tuple[int, float]:
    """(threshold, keep probability): a signed 16-bit lane is kept when it is below
    `threshold`, which happens with the returned probability, the multiple of 2^-16
    nearest 1 - p."""
    kept_lanes = round((1.0 - p) * _LANES)
    return kept_lanes - _LANES // 2, kept_lanes / _LANES


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A boolean CPU tensor of `shape`, each element True with probability 1 - p (to 2^-17)."""
    threshold, _ = keep_threshold(p)
    n = shape.numel()
    # from=-2**63, to=None asks for all 64 bits (plain `random_()` on int64 leaves the top bit
    # zero, which would bias every fourth lane).
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    return bits.view(torch.int16)[:n].view(shape) < threshold


def dropout_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of `shape`: 1 / keep-probability where kept, 0 where dropped."""
    scale = torch.tensor(1.0 / keep_threshold(p)[1], dtype=dtype)
    return torch.where(keep_mask(shape, p), scale, 0)


def uses_bulk_dropout(x: torch.Tensor) -> bool:
    """Whether `dropout` takes the bulk-bits path for `x` (plain CPU tensors, eager mode)."""
    return x.device.type == "cpu" and not isinstance(x, DTensor) and not _compiling()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with bulk random bits for plain CPU tensors."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    keep_prob = keep_threshold(p)[1]
    if not 0.0 < keep_prob < 1.0 or not uses_bulk_dropout(x):  # p within 2^-17 of 0 or 1
        return F.dropout(x, p, training)
    return x * dropout_mask(x.shape, p, x.dtype)


def _compiling() -> bool:
    return torch.compiler.is_compiling()
