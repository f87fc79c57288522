"""`StagePlan`: what every task of one stage run agrees on, the base of each stage's plan.

The driver builds the plan once (inputs expanded, shares fixed) and every task gets it pickled
inside its step, so a task on another process or node splits the work exactly as the driver did.
A stage's plan adds its own parameters and its steps' fingerprints; the base holds what they all
have: the config, the output and whether it is one file, the private work directory, the input
files with their shares, and the part files the last step publishes as the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from data_pipeline import ownership
from data_pipeline.documents import expand_inputs
from data_pipeline.runtime import scaleout

# tasks=0: one task per 256 MiB of input, so a task is short (each stage's rate per core:
# docs/benchmarks.md, "Data pipeline") and a rerun after a failure redoes little.
BYTES_PER_TASK = 256 << 20
# Part files of a JSONL output: zstd-compressed, so the work directory holds about what the
# output will (the report step joins or hard-links them into the output).
PART_SUFFIX = ".jsonl.zst"


def file_fingerprint(files: list[Path]) -> list[list]:
    """What a step's files depend on in its inputs: each file's resolved path, size and mtime."""
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


class StagePlan:
    """The config, `out` (and `to_file`: one JSONL file, else a directory of parts), the private
    `work` directory, the input `files` with their `tasks` contiguous `shares`, and `part(r)`.

    `stage` names the stage (its work directory is `opt-train-<stage>.work` under `work_dir`);
    `work_beside` is the work directory's name beside the output when `work_dir` is unset, with
    `{name}` the output's name: a rerun must find the directory an earlier run left, so these
    names are part of a stage's on-disk contract and never change."""

    stage: ClassVar[str]
    work_beside: ClassVar[str] = ".{name}.work"
    parts_dir: ClassVar[str] = "parts"
    part_suffix: ClassVar[str] = PART_SUFFIX

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.out = Path(cfg.output)
        beside = self.out.with_name(self.work_beside.format(name=self.out.name))
        self.work = ownership.work_dir(cfg.work_dir, self.stage, beside)
        self.to_file = scaleout.is_file_output(self.out)
        self.parts = self.work / self.parts_dir  # published as the output by the last step
        self.files: list[Path] = []
        self.tasks = 1
        self.shares: list[tuple[int, int]] = [(0, 0)]

    def share_files(self) -> list[int]:
        """Expand `input` into `files` and split them into `tasks` contiguous `shares` of about
        equal bytes; returns the files' sizes."""
        self.files = expand_inputs(self.cfg.input)
        sizes = [p.stat().st_size for p in self.files]
        self.tasks, self.shares = self.split(sizes)
        return sizes

    def split(
        self, sizes: list[int], unit: str = "input files", per_task: int = BYTES_PER_TASK
    ) -> tuple[int, list[tuple[int, int]]]:
        """The task count (`tasks`, or one per `per_task` bytes, at most one per item) and the
        contiguous shares of items of these sizes."""
        tasks = scaleout.auto_tasks(self.cfg, sum(sizes), per_task, len(sizes), unit)
        return tasks, scaleout.contiguous_shares(sizes, tasks)

    def files_fingerprint(self) -> list[list]:
        return file_fingerprint(self.files)

    def part(self, rank: int) -> Path:
        """Task `rank`'s part of the output (reading the parts in rank order gives the output)."""
        return self.parts / f"part-{rank:05d}{self.part_suffix}"
