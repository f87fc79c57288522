"""`profile.enabled=true`: a torch.profiler trace of a window of optimizer steps.

The profiler starts before step `profile.steps[0]` (before its micro-batches, after the other
callbacks' pre_step) and stops after step `profile.steps[1]` (after its evaluation and checkpoint
cadence), on each rank listed in `profile.ranks`. It writes a Chrome/Perfetto JSON trace to
`run_dir/profile/trace_steps<a>-<b>_rank<r>.json`; each step is a `step <n>` range in it. On CUDA,
`profile.memory_snapshot=true` also records the caching allocator's history over the window and
dumps `torch.cuda.memory._snapshot()` to `memory_steps<a>-<b>_rank<r>.pickle`
(pytorch.org/memory_viz draws it). Files appear complete or not at all: each is written under a
temporary name first.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from opt_train.config import ProfileConfig
from opt_train.train.callbacks.base import Callback

if TYPE_CHECKING:
    from opt_train.train.trainer import Trainer

log = logging.getLogger(__name__)

MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept (the oldest are dropped past this)


class Profiler(Callback):
    def __init__(self, run_dir: Path, cfg: ProfileConfig):
        self.dir = Path(run_dir) / "profile"
        self.first, self.last = cfg.steps
        self.cfg = cfg
        self._prof: torch.profiler.profile | None = None
        self._step_range = None
        self._memory = False
        self._on = False

    def on_start(self, trainer: Trainer) -> None:
        self._on = trainer.dist.rank in self.cfg.ranks
        if not self._on:
            return
        if trainer.step >= self.last:
            log.warning(
                "profile.steps=[%d, %d] is already past (resumed at step %d): no trace",
                self.first,
                self.last,
                trainer.step,
            )
            self._on = False
        if self.cfg.memory_snapshot and trainer.device.type != "cuda":
            log.warning(
                "profile.memory_snapshot is CUDA-only (torch.cuda.memory._snapshot); this run "
                "is on %s, so only the profiler trace is written",
                trainer.device.type,
            )

    def pre_step(self, trainer: Trainer) -> None:
        if not self._on:
            return
        if trainer.step == max(self.first, trainer.resumed_step + 1) and self._prof is None:
            self._begin(trainer)
        if self._prof is not None:
            self._step_range = torch.profiler.record_function(f"step {trainer.step}")
            self._step_range.__enter__()

    def post_step(self, trainer: Trainer) -> None:
        if self._prof is None:
            return
        self._end_step_range()
        if trainer.step >= self.last:
            self._finish(trainer)

    def on_close(self, trainer: Trainer, error: BaseException | None) -> None:
        # The run ended inside the window (a stop, an error): keep what was recorded.
        if self._prof is not None:
            self._end_step_range()
            self._finish(trainer)

    def _begin(self, trainer: Trainer) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        cuda = trainer.device.type == "cuda"
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._memory = cuda and self.cfg.memory_snapshot
        if self._memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._prof = torch.profiler.profile(
            activities=activities,
            record_shapes=self.cfg.record_shapes,
            with_stack=self.cfg.with_stack,
            profile_memory=cuda,
        )
        self._prof.start()
        self._start_step = trainer.step

    def _end_step_range(self) -> None:
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None

    def _finish(self, trainer: Trainer) -> None:
        prof, self._prof = self._prof, None
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.dist.rank
        tag = f"steps{self._start_step}-{trainer.step}_rank{rank}"
        trace = self.dir / f"trace_{tag}.json"
        tmp = trace.with_name(trace.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, trace)
        log.info("profiler trace of steps %s: %s", tag, trace)
        if self._memory:
            snap = self.dir / f"memory_{tag}.pickle"
            tmp = snap.with_name(snap.name + ".tmp")
            with open(tmp, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)
            os.replace(tmp, snap)
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("CUDA memory snapshot: %s (open at https://pytorch.org/memory_viz)", snap)
        self._on = False
