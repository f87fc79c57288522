"""What a person watching a run reads on rank 0's console.

Two callbacks show the same fields: `ConsoleLines` prints a plain line every `logging.interval`
steps, for a Slurm log or any file (no carriage returns, one line per write, flushed);
`ProgressBar` draws a tqdm bar for a terminal. `console_callback` picks the bar when stdout is
a terminal (`logging.console=auto`). Both start with lines that say where and what the run is
(device, world size, mesh, model size, the checkpoint it resumed from, the precision and why it
was chosen), and print evaluation and event rows (spike, rollback, checkpoint_failed, ...) as
lines of their own.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import TYPE_CHECKING, TextIO

import torch

from data_pipeline.runtime.progress import format_duration
from opt_train.config import JobConfig
from opt_train.train.callbacks.base import Callback
from opt_train.train.goodput import summary_line
from opt_train.train.metric_rows import row_kind

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """The memory figure worth watching on this device, in GiB, and what it is: on a GPU the
    most the caching allocator ever handed out (what an OOM is about), on CPU the process's
    peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "max alloc"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (2**30 if sys.platform == "darwin" else 2**20), "peak RSS"


def step_fields(row: dict, memory: tuple[float, str] | None = None) -> list[str]:
    """The fields of a step row, formatted as the console shows them."""
    fields = [
        f"loss {row['loss']:.4f}",
        f"lr {row['lr']:.3e}",
        f"grad norm {row['grad_norm']:.3f}",
        f"loss scale {row['loss_scale']:g}",
        f"{row['tokens_per_s']:,.0f} tok/s",
        f"MFU {100 * row['mfu']:.3g}%",
    ]
    if memory is not None:
        fields.append(f"mem {memory[0]:.2f} GiB {memory[1]}")
    if row.get("skipped"):
        fields.append("SKIPPED")
    return fields


def eval_line(row: dict) -> str:
    vals = [f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("val_loss", "downstream"))]
    return " | ".join([f"step {row['step']}", *vals])


def event_line(row: dict) -> str:
    rest = " ".join(
        f"{k}={_short(v) if k != 'documents' else f'{len(v)} (python -m opt_train.provenance)'}"
        for k, v in row.items()
        if k not in ("event", "step")
    )
    return f"step {row['step']} | event {row['event']}" + (f" | {rest}" if rest else "")


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Eta:
    """Time left, from the rate of the steps this process has run. The clock starts at the
    first step's end, so start-up and the first step (compilation, warm-up) do not count."""

    def __init__(self, total_steps: int):
        self.total = total_steps
        self._t0: float | None = None
        self._step0 = 0

    def update(self, step: int, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if self._t0 is None:
            self._t0, self._step0 = now, step
            return None
        done = step - self._step0
        if done <= 0:
            return None
        return (self.total - step) * (now - self._t0) / done


def header_lines(trainer: Trainer) -> list[str]:
    """Where and what the run is, where it started from, and its precision with the reason
    it was chosen (auto: what this device runs well)."""
    cfg = trainer.cfg
    dims = trainer.dims
    device = trainer.device
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    start = (
        f"resumed from {trainer.resumed_from} (step {trainer.resumed_step}, "
        f"{trainer.tokens:,} tokens)"
        if trainer.resumed_from
        else f"fresh start (no checkpoint in {trainer.ckpt.dir})"
    )
    return [
        f"device {where} | world size {trainer.dist.world} | mesh dp_replicate="
        f"{dims.dp_replicate} dp_shard={dims.dp_shard} tp={dims.tp} | engine {cfg.engine}",
        f"model {cfg.model.name}: {trainer.n_params / 1e6:,.2f}M parameters | "
        f"{cfg.train.batch_tokens:,} tokens per step ({trainer.accum} "
        f"micro-batch{'es' if trainer.accum != 1 else ''} of {cfg.train.micro_batch_size} x "
        f"{cfg.data.seq_len} per rank)",
        f"{start} | training to step {cfg.train.max_steps} | run_dir {trainer.run_dir}",
        trainer.precision.line(),
    ]


def end_line(trainer: Trainer) -> str:
    if trainer.preempted:
        return f"preempted at step {trainer.step}: checkpoint saved, exiting to be requeued"
    if trainer.stop_reason:
        return f"stopped at step {trainer.step}: {trainer.stop_reason}"
    return f"finished at step {trainer.step} ({trainer.tokens:,} tokens)"


class _Console(Callback):
    """Rank 0's console: the header, eval and event lines, the end line; subclasses show the
    step rows."""

    def __init__(self, stream: TextIO | None = None):
        self._stream = stream
        self._on = False
        self.eta: Eta | None = None
        self._goodput: dict | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def on_start(self, trainer: Trainer) -> None:
        self._on = trainer.dist.is_main
        if not self._on:
            return
        self.eta = Eta(trainer.cfg.train.max_steps)
        self._open(trainer)
        for line in header_lines(trainer):
            self.write(line)

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if not self._on:
            return
        kind = row_kind(row)
        if kind == "step":
            self.show_step(trainer, row, self.eta.update(row["step"]))
        elif kind == "eval":
            self.write(eval_line(row))
        elif row["event"] == "goodput":  # every evaluation's in metrics.jsonl; the last at close
            self._goodput = row
        else:
            self.write(event_line(row))

    def on_end(self, trainer: Trainer) -> None:
        if self._on:
            self.write(end_line(trainer))

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        # The goodput callback logs the run's last row in its on_close, before this one.
        if self._on and error is None and self._goodput is not None:
            self.write(summary_line(self._goodput))

    def write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def _open(self, trainer: Trainer) -> None:
        pass

    def show_step(self, trainer: Trainer, row: dict, eta: float | None) -> None:
        raise NotImplementedError


class ConsoleLines(_Console):
    """A plain line every `logging.interval` steps (and at the first and the last step)."""

    def __init__(self, interval: int, stream: TextIO | None = None):
        super().__init__(stream)
        self.interval = interval
        self._first = True

    def show_step(self, trainer: Trainer, row: dict, eta: float | None) -> None:
        step, total = row["step"], trainer.cfg.train.max_steps
        if not (self._first or step % self.interval == 0 or step == total):
            return
        self._first = False
        fields = step_fields(row, peak_memory_gib(trainer.device))
        left = "ETA " + (format_duration(eta) if eta is not None else "?")
        self.write(" | ".join([f"step {step}/{total}", *fields, left]))


class ProgressBar(_Console):
    """A tqdm bar (steps done, rate, time left) with the step's fields after it."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream)
        self._bar = None

    def _open(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=trainer.cfg.train.max_steps,
            initial=trainer.step,
            desc="train",
            unit="step",
            file=self.stream,
            dynamic_ncols=True,
        )

    def write(self, line: str) -> None:
        if self._bar is None:
            super().write(line)
        else:
            self._bar.write(line, file=self.stream)

    def on_log(self, trainer: Trainer, row: dict) -> None:
        if self._on and row.get("event") == "rollback":
            # Back to the checkpoint's step at once, before the event lines redraw the bar.
            self._bar.set_postfix_str(f"rolled back to step {row['to_step']}", refresh=False)
            self._move_to(row["to_step"])
        super().on_log(trainer, row)

    def show_step(self, trainer: Trainer, row: dict, eta: float | None) -> None:
        fields = step_fields(row, peak_memory_gib(trainer.device))
        self._bar.set_postfix_str(" | ".join(fields), refresh=False)
        self._move_to(row["step"])

    def _move_to(self, step: int) -> None:
        """The bar's position is the step, not a count of steps shown: a rollback's replay
        shows its steps again. tqdm redraws a forward move at most every 0.1 s but never a
        backward one by itself, so that one is drawn here."""
        back = step < self._bar.n
        self._bar.update(step - self._bar.n)
        if back:
            self._bar.refresh()

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        super().on_close(trainer, error)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def console_callback(cfg: JobConfig, stream: TextIO | None = None) -> Callback:
    """The bar on a terminal, plain lines otherwise (`logging.console` forces either)."""
    mode = cfg.logging.console
    if mode == "auto":
        out = stream or sys.stdout
        mode = "bar" if hasattr(out, "isatty") and out.isatty() else "lines"
    return ProgressBar(stream) if mode == "bar" else ConsoleLines(cfg.logging.interval, stream)
