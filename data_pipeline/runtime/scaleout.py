"""Running a stage as tasks on datatrove's executors: the scale-out keys every stage shares.

A scaled-out stage is a list of steps (map, reduce, ...), each a datatrove `PipelineStep`
(`TaskStep`) whose task `rank` of `world_size` does one share of the work and writes it
atomically into the stage's work directory; `data_pipeline.runtime.executors` runs the steps
on datatrove's local, Slurm or Ray executors, and a rerun redoes only the tasks that did not
finish. The work directory also holds the fingerprint of what its files depend on (inputs,
parameters, task counts); when that changes the directory is cleared and every task runs
again, so completion markers of another run are never trusted.

A stage runs inside `owned`: its output must be ours to replace, its work directory is its own
private one (data_pipeline/ownership.py) and locked for the run, and every process the local
executor forks dies with its parent, so a killed driver leaves nothing running.

Each task's statistics go to `<work>/<step>/task-<rank>.json`; `task_stats` reads them back in
rank order so the stage report sums every task.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import itertools
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep

from data_pipeline import ownership
from data_pipeline.config_limits import AT_LEAST_1, NON_NEGATIVE, POSITIVE, OneOf, check_limits
from data_pipeline.documents import INPUT_LIMITS, AtomicWriter, Rejects, iter_lines
from data_pipeline.files import atomic_write_json, publish_dir, publish_file, temporary_beside
from data_pipeline.runtime.cli import report_path, write_report
from data_pipeline.runtime.progress import Progress

EXECUTORS = ("local", "slurm", "ray")


@dataclass
class SlurmOptions:
    """Where and how the job arrays of `executor=slurm` run."""

    partition: str = ""  # empty: the cluster's default partition
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    sbatch_args: dict = field(default_factory=dict)  # extra sbatch options, e.g. {account: x}
    job_name: str = "opt-data"
    wait: bool = True  # block until the jobs end; exit with their status
    poll_s: float = 2.0


@dataclass
class RayOptions:
    """Where and how the tasks of `executor=ray` run."""

    # Empty: RAY_ADDRESS when set, else a new Ray on this machine (loopback only, stopped when
    # the process exits); `auto` or the head's `host:port`: that running cluster. A process
    # already connected (ray.init before the stage) keeps its Ray.
    address: str = ""
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0  # memory Ray reserves per CPU of a task
    # A new local Ray only: its CPUs (0: workers, else all) and object store (the tasks pass
    # it nothing but the pickled step; 0: Ray's default, 30% of memory).
    num_cpus: int = 0
    object_store_mb: int = 0


@dataclass
class ScaleOut:
    """The keys every scaled-out stage (and the chain) takes."""

    tasks: int = 0  # shares of the work; 0: chosen from the input size
    workers: int = 0  # task processes at once on this machine (local); 0: min(tasks, cpus)
    executor: str = "local"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    ray: RayOptions = field(default_factory=RayOptions)
    # Each task's progress on stderr (data_pipeline.runtime.progress): a bar on a terminal, a plain
    # line every `progress_interval_s` in a log (Slurm, a file).
    progress: bool = True
    progress_interval_s: float = 30.0
    # Bounded input (io.InputLimits): longer lines are rejects; rejects written per task.
    max_line_bytes: int = 64 << 20
    max_rejects: int = 10_000
    reject_text_bytes: int = 4096
    # datatrove's own log lines (pipeline banners, stats tables) on stderr too; they always go
    # to `<work>/executor/<step>/` (driver.log and logs/task_*.log), and errors always show.
    verbose: bool = False

    def __post_init__(self) -> None:
        validate(self)  # at start-up, before a stage plans anything


# Allowed values of the scale-out keys (data_pipeline.config_limits).
SCALEOUT_LIMITS = {
    "tasks": NON_NEGATIVE,
    "workers": NON_NEGATIVE,
    "executor": OneOf(EXECUTORS),
    "progress_interval_s": NON_NEGATIVE,
    **INPUT_LIMITS,
}
SLURM_LIMITS = {"cpus_per_task": AT_LEAST_1, "mem_per_cpu_gb": AT_LEAST_1, "poll_s": POSITIVE}
RAY_LIMITS = {
    "cpus_per_task": AT_LEAST_1,
    "mem_per_cpu_gb": POSITIVE,
    "num_cpus": NON_NEGATIVE,
    "object_store_mb": NON_NEGATIVE,
}


def progress(cfg: ScaleOut, desc: str, total: float | None = None, unit: str = "B") -> Progress:
    """The progress reporter of one task (`desc` names the stage, step and task)."""
    return Progress(desc, total, unit, enabled=cfg.progress, interval_s=cfg.progress_interval_s)


def validate(cfg: ScaleOut) -> None:
    check_limits(cfg, "", SCALEOUT_LIMITS)
    check_limits(cfg.slurm, "slurm", SLURM_LIMITS)
    check_limits(cfg.ray, "ray", RAY_LIMITS)


def auto_tasks(
    cfg: ScaleOut, input_bytes: int, per_task_bytes: int, cap: int, unit: str = "input files"
) -> int:
    """`tasks`, or (0) one task per `per_task_bytes` of input, at least 1 and at most `cap`
    (the number of `unit` there are to share). Says so on stderr when `tasks` asked for more."""
    n = cfg.tasks or -(-input_bytes // per_task_bytes)
    got = max(1, min(n, max(cap, 1)))
    if cfg.tasks > got:
        print(
            f"tasks={cfg.tasks}: {unit} to share: {cap}, so {got} task"
            f"{'s' if got > 1 else ''} (a task takes whole ones)",
            file=sys.stderr,
        )
    return got


def contiguous_shares(sizes: list[int], tasks: int) -> list[tuple[int, int]]:
    """Split items (in order) into `tasks` contiguous ranges [lo, hi) of about equal total size,
    none empty while there are at least as many items as tasks. Concatenating the shares in rank
    order gives the items in their original order, which is what makes the output independent
    of the split."""
    n, total = len(sizes), sum(sizes)
    cum = list(itertools.accumulate(sizes, initial=0))
    bounds = [0]
    for k in range(1, tasks):
        i = bisect.bisect_left(cum, total * k / tasks)
        i = min(max(i, bounds[-1] + 1), n - (tasks - k))  # one item left for each later task
        bounds.append(max(i, bounds[-1]))
    bounds.append(n)
    return [(bounds[r], bounds[r + 1]) for r in range(tasks)]


def even_shares(n: int, tasks: int) -> list[tuple[int, int]]:
    return [(n * r // tasks, n * (r + 1) // tasks) for r in range(tasks)]


# --- work directory --------------------------------------------------------------------------


def prepare_steps(work: Path, steps: list[tuple[str, dict]]) -> None:
    """Keep a step's files (`work/<step>/`, its completion markers in `work/executor/<step>/`)
    only while its fingerprint and every earlier step's are what they were when they were
    made; otherwise clear it and everything after it, so no marker of another run is trusted."""
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "fingerprints.json"
    try:
        old = json.loads(marker.read_text()) if marker.exists() else {}
    except ValueError:
        old = {}
    new, stale = {}, False
    for name, fp in steps:
        new[name] = json.loads(json.dumps(fp, default=str))
        stale = stale or old.get(name) != new[name]
        if stale:
            forget(work, [name])
    write_json(marker, new)


def forget(work: Path, steps: list[str]) -> None:
    """Remove these steps' files and completion markers: they run again. Safe because the
    caller holds the work directory's lock (`owned`): no writer of another run is alive."""
    for name in steps:
        ownership.rmtree(work / name)
        ownership.rmtree(work / "executor" / name)


def writer_alive(temporary: Path) -> bool:
    """Whether the `<name>.tmp-<pid>` temporary belongs to another process still running here
    (a task of this run retried in the same worker reuses its own pid: not alive for this)."""
    tail = temporary.name.rsplit("-", 1)[-1]
    if not tail.isdigit() or int(tail) == os.getpid():
        return False
    try:
        os.kill(int(tail), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(pattern_dir: Path, pattern: str) -> None:
    """Remove the temporaries matching `pattern` that killed writers left (never a live one)."""
    for stale in pattern_dir.glob(pattern):
        if not writer_alive(stale):
            ownership.rmtree(stale)


def completed(work: Path, step: str, tasks: int) -> bool:
    done = work / "executor" / step / "completions"
    return all((done / f"{r:05d}").exists() for r in range(tasks))


def is_file_output(out: Path) -> bool:
    """`output=x.jsonl[.gz|.zst]` is one file; anything else a directory of ordered parts."""
    return out.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".gz", ".zst"))


def finish_parts(parts: list[Path], out: Path, to_file: bool) -> None:
    """Publish the parts (in the work directory) as the output, all at once: for a file
    output their lines joined in order (compressed as its name says), for a directory a new
    directory of them (hard links) that replaces the old one by rename. A reader sees the
    previous output or the new one, never a mix of parts from two runs."""
    ownership.check_output(out)  # before any work: refuse a path that is not ours
    if not report_path(out).exists():  # the output's mark from the moment it is published
        write_report(out, {"stage": "publishing", "output": str(out)})
    if to_file:
        with AtomicWriter(out) as w:
            for p in parts:
                for line in iter_lines(p):
                    w.write_bytes(line)
        return
    tmp = temporary_beside(out)
    ownership.rmtree(tmp)
    tmp.mkdir(parents=True)
    for p in parts:
        try:
            os.link(p, tmp / p.name)
        except OSError:  # another filesystem, or no hard links
            shutil.copy2(p, tmp / p.name)
    ownership.check_output(out)  # checked again: it may have appeared meanwhile
    publish_dir(tmp, out)


def clear_stale(out: Path) -> None:
    """Temporaries a killed run left beside the output (not those of a writer still alive)."""
    remove_stale(out.parent, f".{out.name}.tmp-*")
    remove_stale(out.parent, f".{out.name}.old-*")


def gather_rejects(files: list[Path], reports: list[dict], out: Path) -> Rejects:
    """Every task's rejects, in task order (input order), into one rejects file `out` (none
    when nothing was rejected); the returned Rejects holds the summed counts."""
    rejects = Rejects(None)
    for rep in reports:
        for file, counts in rep["by_file"].items():
            rejects.counts[file].update(counts)
        rejects.not_written += rep.get("not_written", 0)  # each task's file holds its cap
    out.unlink(missing_ok=True)
    if rejects.total:
        tmp = temporary_beside(out)
        with open(tmp, "wb") as f:
            for src in files:
                if src.exists():
                    with open(src, "rb") as g:
                        shutil.copyfileobj(g, f)
        publish_file(tmp, out)
    return rejects


def fresh_task_dir(final: Path) -> Path:
    """An empty temporary directory beside a task's output directory `final`, to be renamed
    onto it when the task is done; removes what a killed attempt left (its temporary
    directories, or a published `final` that a rerun replaces)."""
    remove_stale(final.parent, f".{final.name}.tmp-*")
    ownership.rmtree(final)
    tmp = temporary_beside(final)
    tmp.mkdir(parents=True)
    return tmp


def write_json(path: Path, obj: Any) -> None:
    """A work-directory record (`atomic_write_json`: a crash leaves the old file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj, indent=None)


def task_file(work: Path, step: str, rank: int, suffix: str = ".json") -> Path:
    return work / step / f"task-{rank:05d}{suffix}"


def task_stats(work: Path, step: str, tasks: int) -> list[dict]:
    return [json.loads(task_file(work, step, r).read_text()) for r in range(tasks)]


class TaskStep(PipelineStep):
    """A pipeline step whose task does its share through `self.task(rank, world_size)` (which
    returns its statistics, written to `task-<rank>.json`) and passes no documents on.

    It holds the stage's plan (the driver's: inputs expanded once, shares fixed, so every task,
    pickled to another process or node, sees the same) with its `work` directory and `cfg`."""

    type = "opt-data"
    name = "task"

    def __init__(self, plan: Any):
        super().__init__()
        self.plan = plan
        self.work = Path(plan.work)
        self.cfg = plan.cfg

    def task(self, rank: int, world_size: int) -> dict:
        raise NotImplementedError

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        t, c = time.perf_counter(), time.process_time()
        with self.track_time(unit="task"):
            stats = self.task(rank, world_size)
        stats["seconds"] = round(time.perf_counter() - t, 4)
        stats["cpu_s"] = round(time.process_time() - c, 4)
        # Peak resident set of the process that ran the task (a worker may run several).
        stats["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        for k, v in stats.items():
            if isinstance(v, int) and not isinstance(v, bool):
                self.stat_update(k, value=v)
        write_json(task_file(self.work, self.name, rank), stats)
        return []


# --- a stage's run, around its steps -----------------------------------------------------------


LOCK_NAME = ".lock"
# How long a run waits for the lock before refusing: enough for the processes of a run that was
# just killed to be reaped (they die with their driver, `die_with_parent`), far less than a
# concurrent run takes.
LOCK_WAIT_S = 5.0


@contextlib.contextmanager
def owned(plan: Any, stage: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Around a stage's prepare/run_steps/finish: refuse an output that is not ours, create
    (or check) the private work directory, and hold its lock (flock, as opt_train's run lock:
    the kernel drops it when the last process holding it dies, so a killed run never leaves it
    taken). Forked task processes share the lock, so while any process of a run lives no other
    run can start on its work directory and remove its files under it."""
    ownership.check_output(plan.out)
    while True:
        ownership.claim_work(plan.work, stage)
        path = plan.work / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise ownership.StageBusyError(
                        f"output={plan.out}: another run (pid {holder}) is writing it "
                        f"(lock {path} held); wait for it to end or stop it"
                    ) from None
                time.sleep(0.05)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the run we waited for finished and removed its directory
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        os.close(fd)


def prepare(plan: Any, fingerprints: list[tuple[str, dict]]) -> None:
    """Before a stage's steps run: clear a killed run's temporaries beside the output, keep
    only the step files still valid (prepare_steps), and redo the last step (the one that
    publishes the output) when the output has been removed since."""
    clear_stale(plan.out)
    prepare_steps(plan.work, fingerprints)
    if not plan.out.exists():
        forget(plan.work, [fingerprints[-1][0]])


def finish(stage: str, plan: Any, jobs: list[str], t0: float, count: str, rate: str) -> dict:
    """After the steps: the report (written by the last step) with the stage's wall seconds,
    `rate` = `count` per second and, local, each step's wall seconds; the work directory
    removed unless keep_work. With slurm.wait=false, the submitted job ids instead."""
    cfg = plan.cfg
    if cfg.executor == "slurm" and not cfg.slurm.wait:
        return {"stage": stage, "slurm_jobs": jobs, "work_dir": str(plan.work)}
    report = json.loads(report_path(plan.out).read_text())
    if cfg.executor != "slurm":  # wall seconds of each step, done tasks skipped included
        report["step_seconds"] = json.loads((plan.work / "step_seconds.json").read_text())
    secs = time.perf_counter() - t0
    report["seconds"] = round(secs, 3)
    report[rate] = round(report[count] / secs, 1) if secs > 0 else 0.0
    write_report(plan.out, report)
    if not cfg.keep_work:
        ownership.remove_work(plan.work)
    return report
