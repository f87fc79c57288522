"""The executors a stage's steps run on: datatrove's local, Slurm and Ray executors as this
project uses them, and the process hygiene around them.

- `executor=local`: `LocalPipelineExecutor`, `workers` task processes at once on this machine;
- `executor=slurm`: `SlurmPipelineExecutor`, one job array per step, each after the previous
  one (`--dependency=afterok`, and `--kill-on-invalid-dep=yes` so a failed step cancels the
  next instead of leaving it pending). With `slurm.wait=true` (default) the command waits for
  the jobs and fails when a task did not complete; `wait=false` prints the job ids and returns.
- `executor=ray`: `RayPipelineExecutor`, each step's tasks as Ray actors (`ray.cpus_per_task`
  CPUs and `ray.mem_per_cpu_gb` each) on the Ray this process is connected to; when it is
  connected to none, on `ray.address` (or `RAY_ADDRESS`), or else on a new local Ray that
  listens on 127.0.0.1 only. The steps run one after the other, as locally.

datatrove writes a completion marker per finished task (`<work>/executor/<step>/completions/`),
so running the same command again runs only the tasks that did not finish. Every process the
local executor forks dies with its parent (`die_with_parent`), so a killed driver leaves
nothing running; datatrove's own log lines go to `<work>/executor/<step>/` unless `verbose`.

Imports: `data_pipeline.runtime.scaleout` (the keys, the steps, the work-directory records).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.runtime.scaleout import ScaleOut, TaskStep, validate, write_json

# --- executor construction ------------------------------------------------------------------------


def _slurm_executor_class():
    from datatrove.executor.slurm import SlurmPipelineExecutor

    class _Slurm(SlurmPipelineExecutor):
        """datatrove's Slurm executor without its stats-merging job (the stage's last step
        writes the report from every task's statistics) and without empty sbatch options."""

        def launch_merge_stats(self) -> None:
            pass

        def get_sbatch_args(self, max_array: int = 1) -> dict:
            args = super().get_sbatch_args(max_array)
            return {k: v for k, v in args.items() if v != "" or k == "requeue"}

    return _Slurm


def _local_executor_class():
    from datatrove.executor.local import LocalPipelineExecutor

    class _Local(LocalPipelineExecutor):
        """datatrove's local executor whose tasks log to their files only (and errors to
        stderr) unless `verbose`, and keep doing so after each task."""

        verbose = False

        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
            # datatrove copies a task's log to stderr only for local_rank 0 (else ERRORs only);
            # the local rank names nothing else in a task.
            try:
                return super()._run_for_rank(rank, local_rank if self.verbose else 1, node_rank)
            finally:
                if not self.verbose:  # datatrove's close_task_logger put stderr back at INFO
                    _quiet_loguru(Path(self.logging_dir.path) / "driver.log")

    return _Local


def _cache_loguru_lib_dirs() -> None:
    """loguru builds an exception formatter on every `logger.add`, and each asks sysconfig for
    every install scheme's paths (docs/benchmarks.md, "Dedup as whole processes": CPU per
    call and calls per run). datatrove and this module add sinks around every task and step,
    ~50 times in a one-task dedup run. The answer depends only on sysconfig and sys.path,
    neither of which a stage changes: compute it once per process. Where loguru no longer
    has the method, nothing is changed."""
    import functools

    from loguru import _better_exceptions

    fmt = getattr(_better_exceptions, "ExceptionFormatter", None)
    get = getattr(fmt, "_get_lib_dirs", None)
    if get is not None and not hasattr(get, "cache_info"):
        fmt._get_lib_dirs = staticmethod(functools.cache(get))


def _quiet_loguru(log_file: Path) -> None:
    from loguru import logger

    _cache_loguru_lib_dirs()
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    logger.add(log_file, level="INFO")


@contextlib.contextmanager
def _datatrove_log(logs: Path, verbose: bool) -> Iterator[None]:
    """datatrove logs through loguru to stderr: with stats tables that is a screenful per step.
    Unless `verbose`, send it to `<logs>/driver.log` (tasks: `<logs>/logs/task_*.log`) and show
    errors only; loguru's default sink is back afterwards."""
    if verbose:
        yield
        return
    from datatrove.utils.logging import setup_default_logger

    logs.mkdir(parents=True, exist_ok=True)
    _quiet_loguru(logs / "driver.log")
    try:
        yield
    finally:
        setup_default_logger()


# --- process hygiene: no process of a stage outlives its driver ------------------------------

_PR_SET_PDEATHSIG = 1
_fork_state = {"active": 0, "parent": 0}


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG), so a
    task process or datatrove's Manager server never goes on writing into a work directory
    after its driver was killed. `parent`: the pid that forked us; if it already died before
    the request took effect, exit now."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _before_fork() -> None:
    _fork_state["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    if _fork_state["active"]:
        die_with_parent(_fork_state["parent"])


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _dying_with_driver() -> Iterator[None]:
    """While datatrove's local executor runs a step, every process it forks (its Manager server,
    the pool's task processes, and what they fork in turn) dies with its parent."""
    _fork_state["active"] += 1
    try:
        yield
    finally:
        _fork_state["active"] -= 1


def _step_executor(step: TaskStep, tasks: int, cfg: ScaleOut, logs: Path):
    """The executor of one step on this machine (local) or on Ray."""
    if cfg.executor == "local":
        cls = _local_executor_class()
        cls.verbose = cfg.verbose

        return cls(
            pipeline=[step],
            tasks=tasks,
            workers=min(cfg.workers or os.cpu_count() or 1, tasks),
            logging_dir=str(logs),
            start_method="fork",
        )
    from datatrove.executor.ray import RayPipelineExecutor

    return RayPipelineExecutor(
        pipeline=[step],
        tasks=tasks,
        workers=min(cfg.workers, tasks) if cfg.workers else -1,  # 0: as many as Ray fits
        logging_dir=str(logs),
        cpus_per_task=cfg.ray.cpus_per_task,
        mem_per_cpu_gb=cfg.ray.mem_per_cpu_gb,
    )


def connect_ray(cfg: ScaleOut) -> None:
    """Connect this process to the Ray that `executor=ray` runs on (the one it is connected to,
    else `ray.address` or RAY_ADDRESS, else a new local Ray), and check that a task's
    reservation fits on one of its nodes: Ray would otherwise wait for such a node forever."""
    r = cfg.ray
    address = r.address or os.environ.get("RAY_ADDRESS", "")
    local = not address and not ("ray" in sys.modules and sys.modules["ray"].is_initialized())
    # Ray's switch for nodes that other machines join (on by default on Linux); off, the node
    # address is 127.0.0.1 and a Ray started here binds GCS, raylet and worker ports there
    # only. Read when ray is imported; its processes inherit it. Never for a cluster: its
    # workers must reach this driver at its network address.
    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    before = os.environ.get(key)
    if local:
        os.environ.setdefault(key, "0")
    try:
        import ray

        if not ray.is_initialized():
            opts = {"address": address} if address else {
                "address": "local",
                "num_cpus": r.num_cpus or cfg.workers or os.cpu_count() or 1,
                "include_dashboard": False,
                **({"object_store_memory": r.object_store_mb << 20} if r.object_store_mb else {}),
            }  # fmt: skip
            ray.init(**opts)
    finally:
        if before is None:
            os.environ.pop(key, None)
    need_cpu, need_mem = r.cpus_per_task, r.mem_per_cpu_gb * r.cpus_per_task * 2**30
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= need_cpu and n.get("memory", 0) >= need_mem for n in nodes):
        have = [(n.get("CPU", 0), round(n.get("memory", 0) / 2**30, 2)) for n in nodes]
        raise ValueError(
            f"ray.cpus_per_task={r.cpus_per_task}, ray.mem_per_cpu_gb={r.mem_per_cpu_gb}: a task "
            f"needs {need_cpu} CPUs and {need_mem / 2**30:.2f} GiB on one node; the Ray nodes "
            f"have (CPUs, GiB) {have}"
        )


def run_steps(steps: list[tuple[TaskStep, int]], cfg: ScaleOut, work: Path) -> list[str]:
    """Run each (step, tasks) in order on the configured executor. Returns the Slurm job ids
    (empty for local and Ray; there each step's wall seconds go to `<work>/step_seconds.json`).
    Raises when a task failed (or, waiting on Slurm, did not complete)."""
    validate(cfg)
    logs = work / "executor"
    if cfg.executor in ("local", "ray"):
        if cfg.executor == "ray":
            connect_ray(cfg)
        walls = {}
        for step, tasks in steps:
            t = time.perf_counter()
            ex = _step_executor(step, tasks, cfg, logs / step.name)
            with _datatrove_log(logs / step.name, cfg.verbose), _dying_with_driver():
                ex.run()
            _check_complete(ex, step.name, logs)
            walls[step.name] = round(time.perf_counter() - t, 3)
        write_json(work / "step_seconds.json", walls)
        return []
    s = cfg.slurm
    cls = _slurm_executor_class()
    prev, executors = None, []
    for step, tasks in steps:
        ex = cls(
            pipeline=[step],
            tasks=tasks,
            time=s.time,
            partition=s.partition,
            cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb,
            workers=cfg.workers or -1,
            job_name=f"{s.job_name}-{step.name}",
            qos="",
            sbatch_args={"kill-on-invalid-dep": "yes", **s.sbatch_args},
            logging_dir=str(logs / step.name),
            depends=prev,
            # The environment reaches the job through sbatch's --export=ALL: run the same
            # Python (venv/conda included) that submitted.
            env_command=f"export PATH={Path(sys.executable).parent}:$PATH",
            mail_type="NONE",
        )
        executors.append(ex)
        prev = ex
    executors[-1].run()  # launches the earlier steps first, each depending on the one before
    ids = [str(ex.job_id) for ex in executors if ex.job_id not in (None, -1)]
    if s.wait:
        _wait_slurm(ids, s.poll_s)
        for (step, _), ex in zip(steps, executors, strict=True):
            _check_complete(ex, step.name, logs)
    return ids


def _check_complete(ex, name: str, logs: Path) -> None:
    left = ex.get_incomplete_ranks(skip_completed=True)
    if left:
        raise RuntimeError(
            f"step {name}: tasks {left} did not complete (logs: {logs / name}/logs, "
            f"slurm_logs); run the same command again to redo only them"
        )


def _wait_slurm(ids: list[str], poll_s: float) -> None:
    """Until none of the jobs is pending or running (squeue lists only those)."""
    if not ids:
        return
    while True:
        r = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i %T"],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0 and "Invalid job id" not in r.stderr:
            raise RuntimeError(f"squeue failed ({r.returncode}): {r.stderr.strip()}")
        if r.returncode != 0 or not r.stdout.strip():
            return
        time.sleep(poll_s)
