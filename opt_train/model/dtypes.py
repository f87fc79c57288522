"""The precision names configs use (`precision`, `export.dtype`) and the torch dtypes they mean.

Here, in the lowest layer, because the model's HF export, the parallel package's FSDP2 policy
and the engines' autocast all read the same table."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
