"""What a run reports: metrics.jsonl rows, wandb, the console progress bar, and MFU.

Only rank 0 writes. metrics.jsonl has one JSON object per optimizer step with at least
step, loss, lr, grad_norm, loss_scale, tokens, tokens_per_s, mfu; evaluation rows carry val_loss.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

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


class MetricsLogger:
    """Rank-0 sink for step and eval metrics: JSONL file, wandb, progress bar."""

    def __init__(self, run_dir: Path, cfg, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        _drop_rows_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if cfg.logging.progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", dynamic_ncols=True
            )
        if cfg.logging.wandb != "disabled":
            self._wandb = _init_wandb(run_dir, cfg)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self._bar is not None:
            if "loss" in row:
                self._bar.update(1)
                self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if "val_loss" in row:
                self._bar.write(f"step {row['step']}: val_loss {row['val_loss']:.4f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _drop_rows_after(path: Path, step: int) -> None:
    """A run killed after its last checkpoint logged steps that the resumed run repeats; keep
    one row per step by dropping those (and a torn last line) before appending."""
    if not path.exists():
        return
    kept, dropped = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped = True
            continue
        if row.get("step", 0) > step:
            dropped = True
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{x}\n" for x in kept), encoding="utf-8")
        os.replace(tmp, path)


def _init_wandb(run_dir: Path, cfg):
    """wandb in the run directory; offline by default. The run id is kept in run_dir so a
    resumed run continues the same wandb run. The config logged is the resolved job config,
    which holds no secrets (the API key stays in the environment)."""
    import dataclasses

    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.logging.wandb_project,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        mode=cfg.logging.wandb,
        config=dataclasses.asdict(cfg),
        settings=wandb.Settings(console="off", x_save_requirements=False),
    )
