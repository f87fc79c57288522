"""The training loop, explicit and top to bottom.

`Trainer.__init__` builds everything from the typed config: process group and mesh, model
(on the meta device for big models), parallelism, optimizer, schedule, loss scaler, data.
`Trainer.fit` runs the loop: for each optimizer step, set the LR, run this rank's micro-batches
(gradient accumulation up to `train.batch_tokens`), unscale and check for fp16 overflow on every
rank, clip, step, log, evaluate and save. State that must survive a restart is collected in
`state_dict()`.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from opt_train.checkpoint import CheckpointManager
from opt_train.config import JobConfig
from opt_train.data import GlobalOrderLoader, PackedWindows, resolve_data_path, validation_batches
from opt_train.distributed import DistInfo, init_distributed, shutdown
from opt_train.metrics import MetricsLogger, device_peak_flops, flops_per_token
from opt_train.model import OPT, count_params
from opt_train.optim import LinearWarmupDecay, build_optimizer, clip_grad_norm_, set_lr
from opt_train.parallel_dims import ParallelDims
from opt_train.parallelize import init_sharded_weights, parallelize
from opt_train.precision import DynamicLossScaler, autocast

log = logging.getLogger(__name__)

META_INIT_BYTES = 2 * 2**30  # parallel.init=auto builds on the meta device above this


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
        self.device = self.dist.device
        self.distributed = self.dist.world > 1
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(self.config_yaml)

        # Mesh: data-parallel ranks read different samples; tensor-parallel peers the same.
        self.dims = ParallelDims.from_config(cfg.parallel, self.dist.world)
        self.dims.check_model(cfg.model)
        self.mesh, self.dp_rank = None, 0
        if self.distributed:
            self.mesh, dp_mesh = self.dims.build_mesh(self.device.type)
            self.dp_rank = dp_mesh.get_local_rank()
        self.accum = cfg.grad_accum_steps(self.dims.dp)

        self.model = self._build_model()
        # After init, every data-parallel rank draws its own dropout masks; TP peers share them
        # because they hold replicated activations.
        _seed_everything(cfg.train.seed + self.dp_rank)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = LinearWarmupDecay(cfg.optim, cfg.train.batch_tokens)
        self.scaler = DynamicLossScaler(cfg.loss_scale, enabled=cfg.precision == "fp16")
        # FSDP casts parameters per its mixed-precision policy; one process uses autocast.
        self.autocast_precision = "fp32" if self.distributed else cfg.precision

        data_path = resolve_data_path(cfg.data.path, cfg.data.cache_dir)
        train_windows = PackedWindows(data_path, "train", cfg.data.seq_len)
        data_vocab = train_windows.reader.manifest["vocab_size"]
        if data_vocab > cfg.model.vocab_size:
            raise ValueError(
                f"{data_path}: token ids go up to {data_vocab}, more than "
                f"model.vocab_size={cfg.model.vocab_size}"
            )
        self.loader = GlobalOrderLoader(
            train_windows,
            cfg.train.seed,
            cfg.global_batch_samples(),
            cfg.train.micro_batch_size,
            self.dp_rank,
            self.dims.dp,
        )
        self.val_batches = []
        if cfg.train.eval_interval > 0:
            val_windows = PackedWindows(data_path, "validation", cfg.data.seq_len)
            self.val_batches = validation_batches(
                val_windows,
                cfg.train.micro_batch_size,
                cfg.train.eval_batches,
                self.dp_rank,
                self.dims.dp,
            )

        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.dist)
        self.step = 0
        self.tokens = 0
        self.resumed_from = self._maybe_resume()
        self.resumed_step = self.step

        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.precision, cfg.logging.peak_tflops)
        self.metrics = MetricsLogger(
            self.run_dir, cfg, cfg.train.max_steps, self.step, enabled=self.dist.is_main
        )
        log.info(
            "model %s: %.2fM parameters; mesh dp_replicate=%d dp_shard=%d tp=%d; "
            "%d micro-batches of %d per rank per step; resumed from %s",
            cfg.model.name,
            _full_param_count(cfg.model) / 1e6,
            self.dims.dp_replicate,
            self.dims.dp_shard,
            self.dims.tp,
            self.accum,
            cfg.train.micro_batch_size,
            self.resumed_from,
        )

    def _build_model(self) -> OPT:
        cfg = self.cfg
        fp32_bytes = 4 * _full_param_count(cfg.model)
        meta = self.distributed and (
            cfg.parallel.init == "meta"
            or (cfg.parallel.init == "auto" and fp32_bytes > META_INIT_BYTES)
        )
        # Full init: the same seed on every rank gives every rank the same whole model, which
        # parallelize() then splits, so a sharded run starts from exactly the one-process weights.
        _seed_everything(cfg.train.seed)
        with torch.device("meta" if meta else self.device):
            model = OPT(cfg.model)
        if self.distributed:
            compile_ = cfg.parallel.compile == "on" or (
                cfg.parallel.compile == "auto" and self.device.type == "cuda"
            )
            parallelize(
                model,
                self.dims,
                self.mesh,
                cfg.precision,
                cfg.parallel.activation_checkpoint,
                compile_,
            )
        elif cfg.parallel.activation_checkpoint != "off":
            from opt_train.parallelize import apply_ac

            apply_ac(model, cfg.parallel.activation_checkpoint)
        if meta:
            model.to_empty(device=self.device)
            init_sharded_weights(model, cfg.train.seed)
        return model

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg = self.cfg
        last: dict = {}
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                self.step += 1
                lr = self.schedule(self.step)
                set_lr(self.optimizer, lr)
                out = self.train_step(self.loader.next_step())
                self.tokens += cfg.train.batch_tokens
                dt = time.perf_counter() - t0
                last = {
                    "step": self.step,
                    "loss": out["loss"],
                    "lr": lr,
                    "grad_norm": out["grad_norm"],
                    "loss_scale": out["loss_scale"],
                    "skipped": out["skipped"],
                    "tokens": self.tokens,
                    "tokens_per_s": cfg.train.batch_tokens / dt,
                    "mfu": cfg.train.batch_tokens
                    * self.flops_per_token
                    / dt
                    / (self.peak_flops * self.dist.world),
                    "step_time_s": dt,
                }
                self.metrics.log(last)
                if self.val_batches and self.step % cfg.train.eval_interval == 0:
                    self.metrics.log({"step": self.step, "val_loss": self.evaluate()})
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save()
            if self.step > self.resumed_step and (
                not cfg.checkpoint.interval or self.step % cfg.checkpoint.interval
            ):
                self.save()
        finally:
            self.metrics.close()
        return last

    def train_step(self, micro_batches) -> dict:
        cfg = self.cfg
        self.model.train()
        grad_scale = self.scaler.scale / len(micro_batches)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for inputs, targets in micro_batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast(self.autocast_precision, self.device.type):
                loss = self.model(inputs, targets, cfg.train.loss_chunk_tokens, grad_scale)
            (loss * grad_scale).backward()
            total += loss.detach().float()
        mean_loss = self._mean_over_ranks(total / len(micro_batches))

        params = [p for p in self.model.parameters() if p.grad is not None]
        overflow = self.scaler.found_overflow(params)
        loss_scale = self.scaler.scale
        grad_norm = float("nan")
        if not overflow:
            grad_norm = clip_grad_norm_(params, cfg.optim.clip_grad_norm)
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
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for inputs, targets in self.val_batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast(self.autocast_precision, self.device.type):
                total += self.model(inputs, targets, self.cfg.train.loss_chunk_tokens).float()
        self.model.train()
        return self._mean_over_ranks(total / max(1, len(self.val_batches)))

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        """The mean over data-parallel ranks (TP peers hold equal values; averaging the whole
        world gives the same number)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.dist.world
        return value.item()

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything besides weights and optimizer moments that a resumed run needs."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "data": self.loader.state_dict(),
            "loss_scaler": self.scaler.state_dict(),
            "rng": {"python": _jsonable(random.getstate()), "numpy": _numpy_rng_state()},
            "world": self.dist.world,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.loader.load_state_dict(state["data"])
        self.scaler.load_state_dict(state["loss_scaler"])
        random.setstate(_tuplify(state["rng"]["python"]))
        _set_numpy_rng_state(state["rng"]["numpy"])

    def save(self) -> Path | None:
        return self.ckpt.save(
            self.step, self.model, self.optimizer, self.state_dict(), self.config_yaml
        )

    def _maybe_resume(self) -> str | None:
        path = self.ckpt.latest()
        if path is None:
            return None
        state = self.ckpt.load(path, self.model, self.optimizer)
        self.load_state_dict(state)
        return str(path)


def _full_param_count(model_cfg) -> int:
    with torch.device("meta"):
        return count_params(OPT(model_cfg))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
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
    try:
        return Trainer(cfg).fit()
    finally:
        shutdown()


__all__ = ["Trainer", "train"]
