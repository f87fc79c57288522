"""The training loop, explicit and top to bottom.

`Trainer.__init__` builds everything from the typed config: process group and mesh, model
(on the meta device for big models), parallelism, optimizer, schedule, loss scaler, data.
`Trainer.fit` runs the loop: for each optimizer step, run this rank's micro-batches through the
engine (gradient accumulation up to `train.batch_tokens`), average the loss over ranks, let the
engine step or skip (fp16 overflow, NaN/inf loss or gradient norm: every rank alike), build the
step's metrics, hand them to the callbacks and write them, and stop after a preemption signal
(opt_train/train/signals.py) or a callback's request, agreed by every rank.

The engine (opt_train/engine/base.py: FSDP2 / one process; opt_train/engine/deepspeed.py:
DeepSpeed ZeRO) owns forward/backward, clipping, the optimizer step and the checkpoint weights;
the loop never asks which one it drives. Side concerns (metrics.jsonl, console, wandb,
evaluation and checkpoint cadence, spike recovery) are callbacks (opt_train/train/callbacks/, one
per module; the hooks in base.py). State that must survive a restart is collected in `state_dict()`;
opt_train/checkpoint/manager.py writes it with the model and optimizer.
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
from omegaconf import OmegaConf

from data_pipeline.files import os_error
from data_pipeline.shards import ShardFormatError
from opt_train.checkpoint.manager import CheckpointManager, CheckpointSaveFailed
from opt_train.checkpoint.resume_guard import check_resume
from opt_train.config import JobConfig
from opt_train.data.loader import BadTokenIds, bad_tokens_error, build_data, validation_row
from opt_train.engine.base import StepOutcome, TrainEngine
from opt_train.engine.factory import build_engine
from opt_train.engine.optim import LinearWarmupDecay
from opt_train.engine.precision import DynamicLossScaler, resolve_precision
from opt_train.model.init_from import load_init_weights
from opt_train.model.opt import OPT, param_count
from opt_train.parallel.apply import apply_ac, init_sharded_weights, parallelize
from opt_train.parallel.dims import ParallelDims
from opt_train.parallel.process_groups import (
    DistInfo,
    agree,
    init_distributed,
    name_the_rank_on_timeout,
    shutdown,
)
from opt_train.train.callbacks.base import Callback
from opt_train.train.callbacks.defaults import default_callbacks
from opt_train.train.flops import device_peak_flops, flops_per_token
from opt_train.train.goodput import GoodputLedger
from opt_train.train.phase_timing import PhaseTimer
from opt_train.train.run_files import write_text_atomic
from opt_train.train.run_lock import RunDirLocked, hold_run_lock, holds_run_lock, release_run_locks
from opt_train.train.signals import EXIT_INTERRUPTED, EXIT_REQUEUE, PreemptionFlag

log = logging.getLogger(__name__)

META_INIT_BYTES = 2 * 2**30  # parallel.init=auto builds on the meta device above this


class NonFiniteLoss(FloatingPointError):
    """`train.max_nonfinite_steps` steps in a row had a NaN/inf loss or gradient norm."""


class Trainer:
    def __init__(self, cfg: JobConfig, callbacks: list[Callback] | None = None):
        self.cfg = cfg
        self.goodput = GoodputLedger()  # wall time by kind, from this process's start
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
        # Before anything is written: one run per run_dir (opt_train/train/run_lock.py).
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_lock = hold_run_lock(self.run_dir, self.dist)
        self._write_config()  # as given: before precision and micro-batch are resolved
        self._resolve_precision()
        self._build_mesh()
        self.accum = cfg.grad_accum_steps(self.dims.dp)
        # The validation set is sized by one rank's micro-batch, whatever the world size.
        val_micro_batch = cfg.resolve_micro_batch(1)
        cfg.train.micro_batch_size = cfg.resolve_micro_batch(self.dims.dp)  # null: derived

        self.n_params = param_count(cfg.model)
        self.model = self._build_model()
        # After init, every data-parallel rank draws its own dropout masks; TP peers share them
        # because they hold replicated activations.
        _seed_everything(cfg.train.seed + self.dp_rank)
        self.engine: TrainEngine = build_engine(cfg, self.model, self.dist.world, self.accum)
        self.schedule = LinearWarmupDecay(cfg.optim, cfg.train.batch_tokens)

        # The sample sequence is a function of the seed and the step alone (opt_train/data/:
        # loader.py, mixture.py); validation sets are one fixed set per source.
        self.loader, self.val_sets = build_data(cfg, self.dp_rank, self.dims.dp, val_micro_batch)

        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints",
            cfg.checkpoint,
            self.dist,
            cfg.parallel.timeout_s,
            run_lock_held=holds_run_lock(self.run_dir),
        )
        self.step = 0
        self.tokens = 0
        self.nonfinite_skips = 0  # steps skipped for a NaN/inf loss or gradient norm, in total
        self.nonfinite_in_a_row = 0
        self.preempted = False  # every rank agreed on a preemption signal: exit to be requeued
        self.interrupted = False  # a SIGINT (Ctrl-C) on some rank: save and exit with 130
        self.stop_reason: str | None = None  # a callback's request_stop, or another rank's
        self._stop_request: str | None = None
        # Where this rank's time goes, span by span (opt_train/train/phase_timing.py).
        self.phases = PhaseTimer(cfg.observe.timing, self.device, cfg.logging.interval)
        self.callbacks: list[Callback] = [*default_callbacks(cfg), *(callbacks or [])]
        self._act_sq = self._watch_final_activations()
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = device_peak_flops(self.device, cfg.precision, cfg.logging.peak_tflops)
        self.config_changes: list[dict] = []
        self.resumed_from = self._maybe_resume()
        self.resumed_step = self.step
        self._log_start()

    def _write_config(self) -> None:
        """`run_dir/config.yaml`, the job config as given (`precision: auto` stays auto: a
        resume elsewhere may resolve it differently). A failed write does not stop the run;
        MetricsFile records it as an event row."""
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(self.cfg))
        self.config_write_error: str | None = None
        if self.dist.is_main:
            if failed := write_text_atomic(self.run_dir / "config.yaml", self.config_yaml):
                self.config_write_error = os_error(failed)

    def _resolve_precision(self) -> None:
        """Everything that computes reads the resolved precision, never `auto`
        (opt_train/engine/precision.py)."""
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.cfg.precision = self.precision.precision
        if self.precision.warning and self.dist.is_main:
            log.warning("%s", self.precision.warning)

    def _build_mesh(self) -> None:
        """The mesh and this rank's data-parallel rank: data-parallel ranks read different
        samples; tensor-parallel peers the same. DeepSpeed's ranks are all data-parallel
        (config.py checks tp=1)."""
        cfg = self.cfg
        self.dims = ParallelDims.from_config(cfg.parallel, self.dist.world)
        self.dims.check_model(cfg.model)
        self.mesh, self.dp_rank = None, self.dist.rank if self.deepspeed else 0
        if self.distributed and not self.deepspeed:
            self.mesh, dp_mesh = self.dims.build_mesh(self.device.type)
            self.dp_rank = dp_mesh.get_local_rank()

    def _log_start(self) -> None:
        cfg = self.cfg
        log.info(
            "model %s: %.2fM parameters; mesh dp_replicate=%d dp_shard=%d tp=%d; "
            "%d micro-batches of %d per rank per step; resumed from %s (torchrun restart %s)",
            cfg.model.name,
            self.n_params / 1e6,
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
        fp32_bytes = 4 * self.n_params
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
            apply_ac(model, cfg.parallel.activation_checkpoint)
        if meta:
            model.to_empty(device=self.device)
            init_sharded_weights(model, cfg.train.seed)
        if cfg.model.init_from:  # each rank reads only its shards (opt_train/model/init_from.py)
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
        """Train to `train.max_steps` (or an agreed stop); returns the last step's metrics."""
        last: dict = {}
        error: BaseException | None = None
        try:
            self._call("on_start")
            for event in self.config_changes:  # allowed config changes at resume (resume_guard.py)
                self.log(event)
            while self.step < self.cfg.train.max_steps:
                if not self.loader.has_next():  # data.exhaust=stop; the same on every rank
                    self.stop_reason = f"data.exhaust=stop: {self.loader.exhausted_reason()}"
                    log.warning("step %d: stopping: %s", self.step, self.stop_reason)
                    break
                self.step += 1
                self._call("pre_step")
                self.phases.begin_step(self.step)
                t0 = time.perf_counter()
                lr = self.schedule(self.step)  # the schedule is a function of the step alone
                out = self.train_step(self.loader.next_step(), lr)
                self.tokens += self.cfg.train.batch_tokens
                last = self._step_metrics(out, lr, time.perf_counter() - t0)
                self._call("on_step_end", last)
                if self.step != last["step"]:
                    # A callback rolled the run back (load_checkpoint; callbacks/stability.py):
                    # this step is undone, so it is neither logged nor evaluated nor saved.
                    continue
                self.log(last)
                self._stop_if_diverged()
                self._call("post_step")
                self.phases.enter("stop_agree")
                stop = self._stop_agreed()
                self.phases.enter("callbacks")
                if stop:
                    break
            self._call("on_end")
        except BaseException as e:
            error = e
            raise
        finally:
            self._call("on_close", error)
        return last

    def train_step(self, micro_batches, lr: float) -> dict:
        """One optimizer step: this rank's micro-batches through the engine, their loss
        averaged over ranks, then the engine's step or (on every rank alike) skip."""
        act_every = self.cfg.logging.activation_norm_interval
        self._log_activations = bool(act_every) and self.step % act_every == 0
        self._act_sq.clear()
        self.phases.enter("forward_backward")
        self.engine.start_step(lr)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for inputs, targets in micro_batches:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            total += self.engine.forward_backward(inputs, targets, len(micro_batches)).float()
        act_sq = torch.stack(self._act_sq).mean() if self._act_sq else None
        # Summed over ranks, a NaN/inf on any rank is NaN/inf on all: every rank skips alike.
        # Out-of-vocabulary ids (found by the loader on the host, where the batch is read, and
        # replaced so that this step's collectives still run) ride in the same all-reduce, so
        # every rank stops here together and none is left waiting in the next step.
        bad_here = self.loader.bad_tokens
        self.phases.enter("loss_reduce")
        mean_loss, act_ms, bad_ranks = self._mean_over_ranks(
            total / len(micro_batches), act_sq, bool(bad_here)
        )
        if bad_ranks:  # before the optimizer step: the weights stay the previous step's
            error = bad_tokens_error(self.step, bad_here, bad_ranks, self.loader.vocab_size)
            log.error("%s", error)
            raise error
        self.phases.enter("optimizer")
        outcome = self.engine.optim_step(math.isfinite(mean_loss))
        self.phases.enter("callbacks")
        self._count_nonfinite(mean_loss, outcome)
        out = {
            "loss": mean_loss,
            "grad_norm": outcome.grad_norm,
            "loss_scale": outcome.loss_scale,
            "skipped": not outcome.stepped,
        }
        if act_ms is not None:
            out["act_rms"] = math.sqrt(act_ms)
        return out

    def _step_metrics(self, out: dict, lr: float, dt: float) -> dict:
        """The step's row of metrics.jsonl (callbacks may add keys in on_step_end)."""
        batch_tokens = self.cfg.train.batch_tokens
        metrics = {
            "step": self.step,
            "loss": out["loss"],
            "lr": lr,
            "grad_norm": out["grad_norm"],
            "loss_scale": out["loss_scale"],
            "skipped": out["skipped"],
            "nonfinite_skips": self.nonfinite_skips,
            "tokens": self.tokens,
            "tokens_per_s": batch_tokens / dt,
            "mfu": batch_tokens * self.flops_per_token / dt / (self.peak_flops * self.dist.world),
            "step_time_s": dt,
        }
        if "act_rms" in out:
            metrics["act_rms"] = out["act_rms"]
        return metrics

    def _count_nonfinite(self, mean_loss: float, outcome: StepOutcome) -> None:
        """Count a skipped step. fp16 gradient overflow is the loss scaler's business (halve
        and retry), not a divergence; any other NaN/inf is counted and, repeated, stops the
        run."""
        nonfinite = not outcome.stepped and not (outcome.overflow and math.isfinite(mean_loss))
        if nonfinite:
            self.nonfinite_skips += 1
            self.nonfinite_in_a_row += 1
            log.warning(
                "step %d skipped: loss %s, grad norm %s (%d in a row)",
                self.step,
                mean_loss,
                outcome.grad_norm,
                self.nonfinite_in_a_row,
            )
        elif outcome.stepped:
            self.nonfinite_in_a_row = 0

    def _stop_if_diverged(self) -> None:
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLoss(
                f"step {self.step}: the loss or gradient norm was NaN/inf for "
                f"{self.nonfinite_in_a_row} steps in a row (train.max_nonfinite_steps="
                f"{limit}); the run has diverged. Resume from an earlier checkpoint with a "
                "lower LR, or skip the bad data with data.skip_steps (docs/fault-tolerance.md)."
            )

    # -- what callbacks call ----------------------------------------------------------------

    def log(self, row: dict) -> None:
        """Send a row to every callback's on_log (metrics.jsonl, wandb, console), in order."""
        self._call("on_log", row)

    def log_event(self, event: str, **fields) -> None:
        """An event row `{"event": event, "step": <this step>, **fields}` in metrics.jsonl."""
        self.log({"event": event, "step": self.step, **fields})

    def rewind(self, step: int, events: list[dict]) -> None:
        """The rows logged after `step` no longer hold (a rollback to `step`'s checkpoint):
        every callback's on_rewind drops what it wrote for them and writes `events`."""
        self._call("on_rewind", step, events)

    def request_stop(self, reason: str) -> None:
        """End the run after this step, as if `train.max_steps` were reached (final save
        included). Any rank may ask; every rank stops after the same step."""
        self._stop_request = reason

    def run_evaluation(self) -> dict:
        """Evaluate, let callbacks add to the row (on_eval), write it; returns the row."""
        with self.phases.span("eval"):
            row = {"step": self.step, **self.evaluate()}
        self._call("on_eval", row)
        self.log(row)
        return row

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            if cb.goodput_kind is None:
                getattr(cb, hook)(self, *args)
            else:  # lost time of that kind (evaluation, checkpoint saves): train/goodput.py
                with self.goodput.bracket(cb.goodput_kind, self.step):
                    getattr(cb, hook)(self, *args)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """`val_loss` (and `val_loss/<name>` per named source): each source's mean over its
        fixed validation set, averaged over ranks in one all-reduce."""
        if not self.val_sets:
            return {}
        self.model.eval()
        logging_acts, self._log_activations = self._log_activations, False
        means = []
        for vs in self.val_sets:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
            for inputs, targets in vs.batches:
                total += self.engine.eval_loss(inputs.to(self.device), targets.to(self.device))
            means.append(total / max(1, len(vs.batches)))
        self.model.train()
        self._log_activations = logging_acts
        means = torch.stack(means)
        # TP peers hold equal values: the world mean is the DP mean.
        means = agree(means, "sum") / self.dist.world
        return validation_row(self.val_sets, means.tolist())

    def _mean_over_ranks(
        self, value: torch.Tensor, extra: torch.Tensor | None = None, flag: bool = False
    ) -> tuple[float, float | None, int]:
        """The mean over ranks of `value` (and of `extra`), and the number of ranks that
        raised `flag`, all in one all-reduce. TP peers hold equal values, so averaging the
        whole world equals averaging the DP ranks."""
        both = torch.stack(
            [
                value,
                extra if extra is not None else torch.zeros_like(value),
                value.new_full((), float(flag)),  # a fill on the device: no copy, no sync
            ]
        )
        agree(both, "sum")
        both[:2] /= self.dist.world
        a, b, flags = both.tolist()
        return a, (b if extra is not None else None), round(flags)

    def _stop_agreed(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1, SIGINT or a callback's request_stop: MAX over
        ranks, so all stop after this step."""
        flags = torch.tensor(
            [
                int(self.preemption.requested),
                int(self._stop_request is not None),
                int(self.preemption.interrupted),
            ],
            device=self.device,
        )
        preempted, stop, interrupted = agree(flags, "max").tolist()
        self.preempted = bool(preempted)
        # A preemption wins over Ctrl-C: its exit status asks for the requeue the job needs.
        self.interrupted = bool(interrupted) and not self.preempted
        if self.interrupted and not stop:
            stop, self._stop_request = 1, "interrupted (SIGINT); checkpoint saved"
        if stop:
            self.stop_reason = self._stop_request or "requested on another rank"
            log.warning("step %d: stopping: %s", self.step, self.stop_reason)
        return bool(preempted or stop)

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything besides weights, optimizer moments and RNG states (checkpoint.py keeps
        those per rank) that a resumed run needs. The LR is not here: it is schedule(step)."""
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "data": self.loader.state_dict(),
            **self.engine.state_dict(),  # "loss_scaler"
            "nonfinite_skips": self.nonfinite_skips,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "world": self.dist.world,
            "mesh": self._mesh(),
            "precision": self.cfg.precision,  # resolved: what `auto` was here (resume_guard.py)
            "goodput": self.goodput.state_dict(),
        }
        callbacks = {cb.key: sd for cb in self.callbacks if (sd := cb.state_dict())}
        if callbacks:
            state["callbacks"] = callbacks
        return state

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
        self.engine.load_state_dict(state)
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        if "goodput" in state:  # older checkpoints have none; a rollback's is not loaded
            self.goodput.load_state_dict(state["goodput"])
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.key in saved:
                cb.load_state_dict(saved[cb.key])

    @property
    def scaler(self) -> DynamicLossScaler:
        """Our fp16 loss scaler (disabled under DeepSpeed, which scales by itself)."""
        return self.engine.scaler

    def save(self, blocking: bool = False) -> Path:
        """Checkpoint this step (collective: every rank calls it)."""
        with self.phases.span("checkpoint"):
            weights, state = self.engine.weights, self.state_dict()
            return self.ckpt.save(self.step, weights, state, self.config_yaml, blocking=blocking)

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, RNG and trainer state (callbacks' included) from a
        checkpoint directory (collective: every rank calls it)."""
        self.load_state_dict(self.ckpt.load(path, self.engine.weights, self._mesh()))

    def _maybe_resume(self) -> str | None:
        path = self.ckpt.latest()
        if path is None:
            return None
        self.config_changes = check_resume(
            path, self.config_yaml, self.cfg.checkpoint.allow_changes, self.cfg.precision
        )
        self.load_checkpoint(path)
        return str(path)

    def close(self) -> None:
        """Wait for a save in flight and restore default signal handling."""
        try:
            self.ckpt.close()
        finally:
            self.preemption.uninstall()
            if self.run_lock is not None:
                self.run_lock.release()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: JobConfig) -> dict:
    """Run one training job to `train.max_steps`; returns the last step's metrics.

    Exits the process with `EXIT_REQUEUE` (85) after a preemption signal, once the checkpoint
    is saved and the process group is left cleanly. A collective timeout is re-raised naming
    this rank; the process group is then left without the closing barrier. A run_dir held by
    another run exits with 87 (opt_train.train.run_lock.EXIT_RUN_DIR_LOCKED),
    `checkpoint.max_failures` failed saves in a row with 86
    (opt_train.checkpoint.manager.EXIT_CHECKPOINT_FAILED)."""
    rank = int(os.environ.get("RANK", "0"))
    clean = False
    trainer = None
    try:
        with name_the_rank_on_timeout(rank, cfg.parallel.timeout_s):
            trainer = Trainer(cfg)
            last = trainer.fit()
            trainer.close()
        clean = True
    except (BadTokenIds, ShardFormatError) as e:
        # Bad data, not a crash: every rank stops at the same point (bad ids after the step's
        # all-reduce; shard checks at start-up read the same files), so the group is left
        # cleanly and the message stands alone (the bad rank's names the shard and document).
        clean = True
        raise SystemExit(f"error: {e}") from None
    except (RunDirLocked, CheckpointSaveFailed) as e:
        # Both are agreed stops: every rank raises the same one at the same point, so the
        # group is left cleanly (without the barrier a rank could crash at exit, status -6).
        clean = True
        if rank == 0:
            log.error("%s", e)
        raise SystemExit(e.exit_code) from None
    finally:
        if trainer is not None and not clean:
            # Failing: let SIGTERM (torchrun stopping the group to restart it) end this
            # process now instead of waiting for a step that will not come.
            trainer.preemption.uninstall()
        shutdown(clean)
        release_run_locks()  # any way out but a kill leaves the run_dir free, record cleared
    if trainer.preempted:
        log.warning(
            "rank %d: checkpoint saved; exiting with status %d (requeue)", rank, EXIT_REQUEUE
        )
        raise SystemExit(EXIT_REQUEUE)
    if trainer.interrupted:
        log.warning("rank %d: checkpoint saved; exiting with status %d", rank, EXIT_INTERRUPTED)
        raise SystemExit(EXIT_INTERRUPTED)
    return last


__all__ = ["NonFiniteLoss", "Trainer", "train"]
