"""The training loop, explicit and top to bottom.

`Trainer.__init__` builds everything from the typed config: process group and mesh, model
(on the meta device for big models), parallelism, optimizer, schedule, loss scaler, data.
`Trainer.fit` runs the loop: for each optimizer step, set the LR, run this rank's micro-batches
(gradient accumulation up to `train.batch_tokens`), unscale and check for fp16 overflow on every
rank, skip the step if the loss or gradient norm is not finite, clip, step, log, evaluate, save,
and stop after a preemption signal (opt_train/signals.py). State that must survive a restart is
collected in `state_dict()`; opt_train/checkpoint.py writes it with the model and optimizer.

With `engine=deepspeed` the same loop drives a DeepSpeed ZeRO engine (opt_train/
deepspeed_engine.py), which then owns gradient averaging, clipping and the optimizer step.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from opt_train.checkpoint import CheckpointManager, DCPWeights
from opt_train.config import JobConfig
from opt_train.data import GlobalOrderLoader, PackedWindows, resolve_data_path, validation_batches
from opt_train.distributed import DistInfo, init_distributed, name_the_rank_on_timeout, shutdown
from opt_train.init_from import load_init_weights
from opt_train.metrics import MetricsLogger, device_peak_flops, flops_per_token
from opt_train.model import OPT, count_params
from opt_train.optim import LinearWarmupDecay, build_optimizer, clip_grad_norm_, set_lr
from opt_train.parallel_dims import ParallelDims
from opt_train.parallelize import init_sharded_weights, parallelize
from opt_train.precision import DynamicLossScaler, autocast
from opt_train.resume_guard import check_resume
from opt_train.signals import EXIT_REQUEUE, PreemptionFlag

log = logging.getLogger(__name__)

META_INIT_BYTES = 2 * 2**30  # parallel.init=auto builds on the meta device above this


class NonFiniteLoss(FloatingPointError):
    """`train.max_nonfinite_steps` steps in a row had a NaN/inf loss or gradient norm."""


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        # First, so that a preemption during start-up is not lost (it stops after step one).
        self.preemption = PreemptionFlag().install()
        self.deepspeed = cfg.engine == "deepspeed"
        self.dist: DistInfo = init_distributed(
            cfg.train.device, cfg.parallel.timeout_s, alone_too=self.deepspeed
        )
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
        # DeepSpeed's ranks are all data-parallel (config.py checks tp=1).
        self.dims = ParallelDims.from_config(cfg.parallel, self.dist.world)
        self.dims.check_model(cfg.model)
        self.mesh, self.dp_rank = None, self.dist.rank if self.deepspeed else 0
        if self.distributed and not self.deepspeed:
            self.mesh, dp_mesh = self.dims.build_mesh(self.device.type)
            self.dp_rank = dp_mesh.get_local_rank()
        self.accum = cfg.grad_accum_steps(self.dims.dp)
        cfg.train.micro_batch_size = cfg.resolve_micro_batch(self.dims.dp)  # null: derived

        self.model = self._build_model()
        # After init, every data-parallel rank draws its own dropout masks; TP peers share them
        # because they hold replicated activations.
        _seed_everything(cfg.train.seed + self.dp_rank)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.engine = None
        if self.deepspeed:
            from opt_train.deepspeed_engine import ZeroEngine

            self.engine = ZeroEngine(self.model, self.optimizer, cfg, self.dist.world, self.accum)
            self.optimizer = self.engine.optimizer  # DeepSpeed's wrapper; the LR is set on it
            self.weights = self.engine.weights()
        else:
            self.weights = DCPWeights(self.model, self.optimizer, cfg.checkpoint.write_threads)
        self.schedule = LinearWarmupDecay(cfg.optim, cfg.train.batch_tokens)
        # Under DeepSpeed fp16 its own scaler, set from the same loss_scale.* keys, is used.
        self.scaler = DynamicLossScaler(
            cfg.loss_scale, enabled=cfg.precision == "fp16" and not self.deepspeed
        )
        # FSDP and DeepSpeed cast parameters to the low precision themselves; one process
        # uses autocast.
        self.autocast_precision = "fp32" if self.distributed or self.deepspeed else cfg.precision

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
            skip_steps=[tuple(r) for r in cfg.data.skip_steps],
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

        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", cfg.checkpoint, self.dist, cfg.parallel.timeout_s
        )
        self.step = 0
        self.tokens = 0
        self.nonfinite_skips = 0  # steps skipped for a NaN/inf loss or gradient norm, in total
        self.nonfinite_in_a_row = 0
        self.preempted = False
        self._act_sq = self._watch_final_activations()
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        # Before the resume: measuring the CPU's peak draws random matrices from the global
        # generator, which would otherwise move the restored RNG stream.
        self.peak_flops = device_peak_flops(self.device, cfg.precision, cfg.logging.peak_tflops)
        self.config_changes: list[dict] = []
        self.resumed_from = self._maybe_resume()
        self.resumed_step = self.step
        self.metrics = MetricsLogger(
            self.run_dir, cfg, cfg.train.max_steps, self.step, enabled=self.dist.is_main
        )
        for event in self.config_changes:  # allowed config changes at resume (resume_guard.py)
            self.metrics.log(event)
        log.info(
            "model %s: %.2fM parameters; mesh dp_replicate=%d dp_shard=%d tp=%d; "
            "%d micro-batches of %d per rank per step; resumed from %s (torchrun restart %s)",
            cfg.model.name,
            _full_param_count(cfg.model) / 1e6,
            self.dims.dp_replicate,
            self.dims.dp_shard,
            self.dims.tp,
            self.accum,
            cfg.train.micro_batch_size,
            self.resumed_from,
            os.environ.get("TORCHELASTIC_RESTART_COUNT", "-"),
        )

    def _build_model(self) -> OPT:
        cfg = self.cfg
        fp32_bytes = 4 * _full_param_count(cfg.model)
        meta = (
            self.distributed
            and not self.deepspeed
            and (
                cfg.parallel.init == "meta"
                or (cfg.parallel.init == "auto" and fp32_bytes > META_INIT_BYTES)
            )
        )
        # Full init: the same seed on every rank gives every rank the same whole model, which
        # parallelize() then splits, so a sharded run starts from exactly the one-process weights.
        _seed_everything(cfg.train.seed)
        with torch.device("meta" if meta else self.device):
            model = OPT(cfg.model)
        if self.distributed and not self.deepspeed:
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
        if cfg.model.init_from:  # each rank reads only its shards (opt_train/init_from.py)
            load_init_weights(model, cfg.model)
        return model

    def _watch_final_activations(self) -> list[torch.Tensor]:
        """A forward hook on the module that produces the final hidden states; on logging
        steps it adds their mean square (fp32) to the returned list. Outside the model, so
        model.py stays plain; the hook costs nothing on other steps."""
        m = self.model
        last = m.project_out or m.final_layer_norm or m.layers[-1]
        sums: list[torch.Tensor] = []

        def hook(module, args, out) -> None:
            if self._log_activations:
                h = out.to_local() if hasattr(out, "to_local") else out
                sums.append(h.detach().float().pow(2).mean())

        self._log_activations = False
        last.register_forward_hook(hook)
        return sums

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg = self.cfg
        last: dict = {}
        act_every = cfg.logging.activation_norm_interval
        try:
            while self.step < cfg.train.max_steps:
                t0 = time.perf_counter()
                self.step += 1
                lr = self.schedule(self.step)  # the schedule is a function of the step alone
                set_lr(self.optimizer, lr)
                self._log_activations = bool(act_every) and self.step % act_every == 0
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
                    "nonfinite_skips": self.nonfinite_skips,
                    "tokens": self.tokens,
                    "tokens_per_s": cfg.train.batch_tokens / dt,
                    "mfu": cfg.train.batch_tokens
                    * self.flops_per_token
                    / dt
                    / (self.peak_flops * self.dist.world),
                    "step_time_s": dt,
                }
                if "act_rms" in out:
                    last["act_rms"] = out["act_rms"]
                self.metrics.log(last)
                if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLoss(
                        f"step {self.step}: the loss or gradient norm was NaN/inf for "
                        f"{self.nonfinite_in_a_row} steps in a row (train.max_nonfinite_steps="
                        f"{cfg.train.max_nonfinite_steps}); the run has diverged. Resume from an "
                        "earlier checkpoint with a lower LR, or skip the bad data with "
                        "data.skip_steps (docs/fault-tolerance.md)."
                    )
                if self.val_batches and self.step % cfg.train.eval_interval == 0:
                    self.metrics.log({"step": self.step, "val_loss": self.evaluate()})
                if self._preemption_agreed():
                    log.warning("preempted: saving step %d, then exiting", self.step)
                    self.save(blocking=True)
                    self.preempted = True
                    return last
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save()
            if self.step > self.resumed_step and self.ckpt.last_saved_step != self.step:
                self.save()
            self.ckpt.wait()  # the final checkpoint is on disk before the run reports success
        finally:
            self.metrics.close()
        return last

    def train_step(self, micro_batches) -> dict:
        if self.engine is not None:
            return self._train_step_deepspeed(micro_batches)
        cfg = self.cfg
        self.model.train()
        self._act_sq.clear()
        grad_scale = self.scaler.scale / len(micro_batches)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for inputs, targets in micro_batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast(self.autocast_precision, self.device.type):
                loss = self.model(inputs, targets, cfg.train.loss_chunk_tokens, grad_scale)
            (loss * grad_scale).backward()
            total += loss.detach().float()
        act_sq = torch.stack(self._act_sq).mean() if self._act_sq else None
        # Summed over ranks, a NaN/inf on any rank is NaN/inf on all: every rank skips alike.
        mean_loss, act_ms = self._mean_over_ranks(total / len(micro_batches), act_sq)

        params = [p for p in self.model.parameters() if p.grad is not None]
        loss_ok = math.isfinite(mean_loss)
        overflow = self.scaler.found_overflow(params)  # fp16 only: unscales, agrees over ranks
        loss_scale = self.scaler.scale
        grad_norm = float("nan")
        stepped = False
        if loss_ok and not overflow:
            # The norm is a global reduction, so every rank sees the same value here too.
            grad_norm = clip_grad_norm_(params, cfg.optim.clip_grad_norm)
            if math.isfinite(grad_norm):
                self.optimizer.step()
                stepped = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update(overflow or not loss_ok)
        return self._outcome(mean_loss, act_ms, grad_norm, loss_scale, stepped, overflow)

    def _train_step_deepspeed(self, micro_batches) -> dict:
        """The same step through DeepSpeed: its `engine.step()` after the last micro-batch
        averages gradients over ranks, clips, and applies the optimizer step or, when the
        gradient norm is NaN/inf (as after a NaN loss on any rank) or fp16 overflowed, skips it."""
        self.model.train()
        self._act_sq.clear()
        loss_scale = self.engine.loss_scale()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for inputs, targets in micro_batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            loss = self.engine.micro_step(inputs, targets, self.cfg.train.loss_chunk_tokens)
            total += loss.float()
        act_sq = torch.stack(self._act_sq).mean() if self._act_sq else None
        mean_loss, act_ms = self._mean_over_ranks(total / len(micro_batches), act_sq)
        stepped, grad_norm = self.engine.outcome(loss_scale)
        overflow = self.cfg.precision == "fp16" and not stepped and math.isfinite(mean_loss)
        return self._outcome(mean_loss, act_ms, grad_norm, loss_scale, stepped, overflow)

    def _outcome(
        self,
        mean_loss: float,
        act_ms: float | None,
        grad_norm: float,
        loss_scale: float,
        stepped: bool,
        overflow: bool,
    ) -> dict:
        """Count a skipped step and report the step's metrics. fp16 gradient overflow is the
        loss scaler's business (halve and retry), not a divergence; any other NaN/inf is
        counted and, repeated, stops the run."""
        nonfinite = not stepped and not (overflow and math.isfinite(mean_loss))
        if nonfinite:
            self.nonfinite_skips += 1
            self.nonfinite_in_a_row += 1
            log.warning(
                "step %d skipped: loss %s, grad norm %s (%d in a row)",
                self.step,
                mean_loss,
                grad_norm,
                self.nonfinite_in_a_row,
            )
        elif stepped:
            self.nonfinite_in_a_row = 0
        out = {
            "loss": mean_loss,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "skipped": not stepped,
        }
        if act_ms is not None:
            out["act_rms"] = math.sqrt(act_ms)
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        logging_acts, self._log_activations = self._log_activations, False
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for inputs, targets in self.val_batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast(self.autocast_precision, self.device.type):
                total += self.model(inputs, targets, self.cfg.train.loss_chunk_tokens).float()
        self.model.train()
        self._log_activations = logging_acts
        return self._mean_over_ranks(total / max(1, len(self.val_batches)))[0]

    def _mean_over_ranks(
        self, value: torch.Tensor, extra: torch.Tensor | None = None
    ) -> tuple[float, float | None]:
        """The mean over ranks of `value` (and of `extra`, in the same all-reduce). TP peers
        hold equal values, so averaging the whole world equals averaging the DP ranks."""
        both = torch.stack([value, extra if extra is not None else torch.zeros_like(value)])
        if self.distributed:
            dist.all_reduce(both)
            both /= self.dist.world
        a, b = both.tolist()
        return a, (b if extra is not None else None)

    def _preemption_agreed(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1: MAX over ranks, so all stop after this step."""
        flag = torch.tensor([int(self.preemption.requested)], device=self.device)
        if self.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything besides weights, optimizer moments and RNG states (checkpoint.py keeps
        those per rank) that a resumed run needs. The LR is not here: it is schedule(step)."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "data": self.loader.state_dict(),
            "loss_scaler": self.scaler.state_dict(),
            "nonfinite_skips": self.nonfinite_skips,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "world": self.dist.world,
            "mesh": self._mesh(),
        }

    def _mesh(self) -> dict:
        return {
            "dp_replicate": self.dims.dp_replicate,
            "dp_shard": self.dims.dp_shard,
            "tp": self.dims.tp,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.loader.load_state_dict(state["data"])
        self.scaler.load_state_dict(state["loss_scaler"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))

    def save(self, blocking: bool = False) -> Path:
        return self.ckpt.save(
            self.step,
            self.weights,
            self.state_dict(),
            self.config_yaml,
            blocking=blocking,
        )

    def _maybe_resume(self) -> str | None:
        path = self.ckpt.latest()
        if path is None:
            return None
        self.config_changes = check_resume(
            path, self.config_yaml, self.cfg.checkpoint.allow_changes
        )
        self.load_state_dict(self.ckpt.load(path, self.weights, self._mesh()))
        return str(path)

    def close(self) -> None:
        """Wait for a save in flight and restore default signal handling."""
        try:
            self.ckpt.close()
        finally:
            self.preemption.uninstall()


def _full_param_count(model_cfg) -> int:
    with torch.device("meta"):
        return count_params(OPT(model_cfg))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: JobConfig) -> dict:
    """Run one training job to `train.max_steps`; returns the last step's metrics.

    Exits the process with `EXIT_REQUEUE` (85) after a preemption signal, once the checkpoint
    is saved and the process group is left cleanly. A collective timeout is re-raised naming
    this rank; the process group is then left without the closing barrier."""
    rank = int(os.environ.get("RANK", "0"))
    clean = False
    trainer = None
    try:
        with name_the_rank_on_timeout(rank, cfg.parallel.timeout_s):
            trainer = Trainer(cfg)
            last = trainer.fit()
            trainer.close()
        clean = True
    finally:
        if trainer is not None and not clean:
            # Failing: let SIGTERM (torchrun stopping the group to restart it) end this
            # process now instead of waiting for a step that will not come.
            trainer.preemption.uninstall()
        shutdown(clean)
    if trainer.preempted:
        log.warning(
            "rank %d: checkpoint saved; exiting with status %d (requeue)", rank, EXIT_REQUEUE
        )
        raise SystemExit(EXIT_REQUEUE)
    return last


__all__ = ["NonFiniteLoss", "Trainer", "train"]
