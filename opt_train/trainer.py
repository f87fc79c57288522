"""The training loop, explicit and top to bottom.

`Trainer.__init__` builds everything from the typed config; `Trainer.fit` runs the loop:
for each optimizer step, set the LR, run the micro-batches (gradient accumulation up to
`train.batch_tokens`), unscale and check for fp16 overflow, clip, step, log, evaluate and save.
State that must survive a restart is collected in `state_dict()`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from opt_train.checkpoint import CheckpointManager
from opt_train.config import JobConfig
from opt_train.data import GlobalOrderLoader, PackedWindows, resolve_data_path, validation_batches
from opt_train.metrics import MetricsLogger, device_peak_flops, flops_per_token
from opt_train.model import OPT, count_params
from opt_train.optim import LinearWarmupDecay, build_optimizer, set_lr
from opt_train.precision import DynamicLossScaler, autocast

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.rank, self.world = 0, 1
        self.device = pick_device(cfg.train.device)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(self.config_yaml)

        _seed_everything(cfg.train.seed)
        data_path = resolve_data_path(cfg.data.path, cfg.data.cache_dir)
        train_windows = PackedWindows(data_path, "train", cfg.data.seq_len)
        if train_windows.reader.manifest["vocab_size"] > cfg.model.vocab_size:
            raise ValueError(
                f"{data_path}: token ids go up to {train_windows.reader.manifest['vocab_size']}, "
                f"more than model.vocab_size={cfg.model.vocab_size}"
            )
        self.accum = cfg.grad_accum_steps(self.world)
        self.loader = GlobalOrderLoader(
            train_windows,
            cfg.train.seed,
            cfg.global_batch_samples(),
            cfg.train.micro_batch_size,
            self.rank,
            self.world,
        )
        self.val_batches = []
        if cfg.train.eval_interval > 0:
            val_windows = PackedWindows(data_path, "validation", cfg.data.seq_len)
            self.val_batches = validation_batches(
                val_windows,
                cfg.train.micro_batch_size,
                cfg.train.eval_batches,
                self.rank,
                self.world,
            )

        self.model = OPT(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = LinearWarmupDecay(cfg.optim, cfg.train.batch_tokens)
        self.scaler = DynamicLossScaler(cfg.loss_scale, enabled=cfg.precision == "fp16")
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep)
        self.step = 0
        self.tokens = 0
        self.resumed_from = self._maybe_resume()

        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.precision, cfg.logging.peak_tflops)
        self.metrics = MetricsLogger(
            self.run_dir, cfg, cfg.train.max_steps, self.step, enabled=self.rank == 0
        )
        log.info(
            "model %s: %.2fM parameters; %d micro-batches of %d per step; resumed from %s",
            cfg.model.name,
            count_params(self.model) / 1e6,
            self.accum,
            cfg.train.micro_batch_size,
            self.resumed_from,
        )

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg = self.cfg
        last = {}
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                self.step += 1
                lr = self.schedule(self.step)
                set_lr(self.optimizer, lr)
                loss = self.train_step(self.loader.next_step())
                step_tokens = cfg.train.batch_tokens
                self.tokens += step_tokens
                dt = time.perf_counter() - t0
                last = {
                    "step": self.step,
                    "loss": loss["loss"],
                    "lr": lr,
                    "grad_norm": loss["grad_norm"],
                    "loss_scale": loss["loss_scale"],
                    "skipped": loss["skipped"],
                    "tokens": self.tokens,
                    "tokens_per_s": step_tokens / dt,
                    "mfu": step_tokens * self.flops_per_token / dt / (self.peak_flops * self.world),
                    "step_time_s": dt,
                }
                self.metrics.log(last)
                if self.val_batches and self.step % cfg.train.eval_interval == 0:
                    self.metrics.log({"step": self.step, "val_loss": self.evaluate()})
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save()
            if self.resumed_from is None or self.step > self.resumed_step:
                self.save()
        finally:
            self.metrics.close()
        return last

    def train_step(self, micro_batches) -> dict:
        cfg = self.cfg
        self.model.train()
        grad_scale = self.scaler.scale / len(micro_batches)
        total = torch.zeros((), dtype=torch.float32)
        for inputs, targets in micro_batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast(cfg.precision, self.device.type):
                loss = self.model(inputs, targets, cfg.train.loss_chunk_tokens, grad_scale)
            (loss * grad_scale).backward()
            total += loss.detach().float().cpu()
        mean_loss = (total / len(micro_batches)).item()

        params = [p for p in self.model.parameters() if p.grad is not None]
        overflow = self.scaler.found_overflow(params)
        loss_scale = self.scaler.scale
        grad_norm = float("nan")
        if not overflow:
            clip = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True).item()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update(overflow)
        return {
            "loss": mean_loss,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "skipped": overflow,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for inputs, targets in self.val_batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast(self.cfg.precision, self.device.type):
                losses.append(
                    self.model(inputs, targets, self.cfg.train.loss_chunk_tokens).float().item()
                )
        self.model.train()
        return float(np.mean(losses))

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything besides weights and optimizer moments that a resumed run needs."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "data": self.loader.state_dict(),
            "loss_scaler": self.scaler.state_dict(),
            "rng": {"python": _jsonable(random.getstate()), "numpy": _numpy_rng_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.loader.load_state_dict(state["data"])
        self.scaler.load_state_dict(state["loss_scaler"])
        random.setstate(_tuplify(state["rng"]["python"]))
        _set_numpy_rng_state(state["rng"]["numpy"])

    def save(self) -> Path:
        return self.ckpt.save(
            self.step,
            self.model.state_dict(),
            self.optimizer.state_dict(),
            self.state_dict(),
            self.config_yaml,
        )

    def _maybe_resume(self) -> str | None:
        path = self.ckpt.latest()
        self.resumed_step = 0
        if path is None:
            return None
        ckpt = CheckpointManager.load(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.load_state_dict(ckpt["state"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.resumed_step = self.step
        return str(path)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _jsonable(obj):
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _tuplify(obj):
    return tuple(_tuplify(x) for x in obj) if isinstance(obj, list) else obj


def _numpy_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": keys.tolist(),
        "pos": pos,
        "has_gauss": has_gauss,
        "cached": cached,
    }


def _set_numpy_rng_state(s: dict) -> None:
    np.random.set_state(
        (s["name"], np.array(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached"])
    )


def train(cfg: JobConfig) -> dict:
    """Run one training job to `train.max_steps`; returns the last step's metrics."""
    return Trainer(cfg).fit()


__all__ = ["Trainer", "train"]
