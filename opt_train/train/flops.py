"""The figures behind MFU: training FLOPs per token and a device's peak FLOP/s.

The rows of metrics.jsonl are built in opt_train/train/trainer.py and written by the callbacks
in opt_train/train/callbacks/ (metrics file, console, wandb, TensorBoard).
"""

from __future__ import annotations

import logging
import re
import time

import torch

from opt_train.config import ModelConfig
from opt_train.engine.precision import cpu_bf16, device_caps

log = logging.getLogger(__name__)

# Peak TFLOP/s of one GPU, dense (without 2:4 sparsity, which training does not use), from the
# vendor's datasheets: NVIDIA A100 Tensor Core GPU datasheet (A100 SXM4 and PCIe); H100 Tensor
# Core GPU datasheet (H100 SXM, PCIe, NVL); H200 Tensor Core GPU datasheet (H200 SXM, NVL);
# L40S, L40, L4 and A10 datasheets; V100 datasheet (SXM2, PCIe). The datasheets print the
# tensor-core figures with sparsity and mark them so; the dense figure is half of those.
# "tf32" is fp32 matmuls on tensor cores (torch.backends.cuda.matmul.allow_tf32), "fp32" without.
# Matched in order against torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3" (SXM),
# "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "Tesla V100-SXM2-32GB";
# whole words only, so that e.g. GH200 (not in the table) is not taken for an H200.
GPU_PEAKS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"\bH200 NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", "H200 SXM", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    (r"\bH100 NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100 PCIe", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    (
        r"\bH100 (80GB HBM3|SXM)",
        "H100 SXM",
        {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
    ),
    (r"\bA100\b.*(SXM|PCI)", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bL40S\b", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", "L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    # No bf16 or TF32 tensor cores on V100: those precisions have no peak to quote.
    (r"\bV100-SXM2", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bV100-PCIE", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
)

_said_unknown: set[str] = set()


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters, output projection included) plus
    attention scores and values, 12 x layers x d_model x seq_len (the PaLM convention; no
    discount for causality)."""
    d, f, v, e = cfg.d_model, cfg.ffn, cfg.vocab_size, cfg.embed_dim
    per_layer = 4 * d * d + 2 * d * f
    proj = 2 * d * e if e != d else 0
    matmul_params = cfg.n_layers * per_layer + proj + v * e
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * d * seq_len


def matmul_precision(precision: str, tf32: bool) -> str:
    """What the matmuls of a run at `precision` execute in: bf16/fp16 as asked; fp32 on TF32
    tensor cores when `tf32` (see opt_train.parallel.process_groups.configure_cuda)."""
    return "tf32" if precision == "fp32" and tf32 else precision


def gpu_peak_tflops(device_name: str, precision: str, tf32: bool) -> tuple[str, float] | None:
    """(model, dense peak TFLOP/s) of a GPU by its name for a run at `precision`, or None when
    the GPU is not in GPU_PEAKS, has no such tensor cores, or is a MIG slice (a fraction of
    the GPU whose share of the peak is not its name's)."""
    if "MIG" in device_name:
        return None
    for pattern, model, peaks in GPU_PEAKS:
        if re.search(pattern, device_name):
            tf = peaks.get(matmul_precision(precision, tf32))
            return (model, tf) if tf else None
    return None


def device_peak_flops(
    device: torch.device, precision: str, configured_tflops: float | None
) -> float:
    """Peak FLOP/s of one device for MFU: configured (`logging.peak_tflops`), a GPU of
    GPU_PEAKS at the precision its matmuls actually run in, or on CPU a measured large-matmul
    rate in the run's compute dtype (so CPU 'MFU' is relative to this machine). `precision` is
    the resolved one (opt_train.engine.precision.resolve_precision), never auto. An unknown GPU
    gets NaN (MFU is then NaN, never a guess), and the log says so once."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak_tflops(name, precision, torch.backends.cuda.matmul.allow_tf32)
        if found is None:
            if name not in _said_unknown:
                _said_unknown.add(name)
                log.warning(
                    "MFU unknown: no %s peak known for GPU %r (opt_train/train/flops.py "
                    "GPU_PEAKS); set logging.peak_tflops to report it",
                    precision,
                    name,
                )
            return float("nan")
        return found[1] * 1e12
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[precision]
    # Emulated bf16 (no AVX512-BF16/AMX/Arm BF16) runs near 1 GFLOP/s, so one 1024^3 matmul
    # takes seconds and a 1024 probe would add them to every start; 256 wide costs 64x less
    # at about the same rate. Rates: `python -c "import torch; from opt_train.train.flops
    # import cpu_matmul_rate as r; print([r(torch.bfloat16, n) / 1e9 for n in (256, 1024)])"`.
    # Decided from the capabilities, not by timing, which a busy machine would skew.
    slow = dtype == torch.bfloat16 and not cpu_bf16(device_caps(device))[0]
    return cpu_matmul_rate(dtype, 256 if slow else 1024)


def cpu_matmul_rate(dtype: torch.dtype, n: int, seconds: float = 0.2) -> float:
    """FLOP/s of the fastest n x n matmul in `dtype` among those run for `seconds`: the
    machine's peak, not its average, so another process busy at start-up does not shrink the
    peak (and push MFU past 100%). A private generator: the probe draws nothing from the global
    one, which seeds dropout."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    a @ a  # the first call sets up the kernel
    fastest, t0 = float("inf"), time.perf_counter()
    while (now := time.perf_counter()) - t0 < seconds:
        a @ a
        fastest = min(fastest, time.perf_counter() - now)
    return 2 * n**3 / fastest
