"""The figures behind MFU: training FLOPs per token and a device's peak FLOP/s.

The rows of metrics.jsonl are built in opt_train/trainer.py and written by the callbacks in
opt_train/callbacks.py (file, progress bar, wandb).
"""

from __future__ import annotations

import time

import torch

from opt_train.config import ModelConfig

# Dense bf16/fp16 tensor-core peaks (TFLOP/s per GPU, without sparsity), by device-name fragment.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "V100": 125.0,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters, output projection included) plus
    attention scores and values, 12 x layers x d_model x seq_len (the PaLM convention; no
    discount for causality)."""
    d, f, v, e = cfg.d_model, cfg.ffn, cfg.vocab_size, cfg.embed_dim
    per_layer = 4 * d * d + 2 * d * f
    proj = 2 * d * e if e != d else 0
    matmul_params = cfg.n_layers * per_layer + proj + v * e
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * d * seq_len


def device_peak_flops(
    device: torch.device, precision: str, configured_tflops: float | None
) -> float:
    """Peak FLOP/s of one device for MFU: configured, a known GPU, or on CPU a measured
    large-matmul rate in the run's compute dtype (so CPU 'MFU' is relative to this machine)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, tf in GPU_PEAK_TFLOPS.items():
            if frag in name:
                return tf * 1e12 if precision != "fp32" else tf * 1e12 / 2  # TF32
        return 100e12
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[precision]
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        a @ a
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0)
