"""launch/slurm/train.sbatch on a real two-node Slurm: a whole run, preemption with requeue,
and node failure with requeue; the resumed runs' losses equal an uninterrupted run's."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import FINAL_STATES
from tests.multirank import TINY_RUN
from tests.opt_train.conftest import write_patterned_shards
from tests.opt_train.garbage import STABLE, TWO_RANKS, garbage_steps
from tests.opt_train.garbage import overrides as stability_overrides
from tests.opt_train.garbage import rows as metrics_rows
from tests.opt_train.garbage import steps as step_rows

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
STEPS = 40
# A 2-layer, 32-wide OPT in fp32 without dropout: a step takes ~0.1 s on two CPU ranks, and
# fp32 with a fixed world size makes continued losses bit-identical after a resume.
TINY = [
    *TINY_RUN,
    "train.eval_interval=0",
    f"train.max_steps={STEPS}",
    "precision=fp32",
]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_patterned_shards(tmp_path_factory.mktemp("slurm-data") / "shards")


def submit(slurm, run_dir: Path, shards: Path, *overrides: str, sbatch_args=()) -> str:
    """`sbatch --nodes=2 launch/slurm/train.sbatch <overrides>` from the repository root, as a
    user would, with this test's Python as the submitting environment's."""
    env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return slurm.sbatch(
        [
            "--nodes=2",
            *sbatch_args,
            f"--output={run_dir.parent}/{run_dir.name}-%j.out",
            str(SBATCH),
            f"run_dir={run_dir}",
            f"data.path={shards}",
            *TINY,
            *overrides,
        ],
        env=env,
        cwd=REPO,
    )


def batch_log(run_dir: Path, job: str) -> str:
    p = run_dir.parent / f"{run_dir.name}-{job}.out"
    return p.read_text() if p.exists() else ""


def node_logs(run_dir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()}" for p in sorted((run_dir / "logs").glob("*.log"))
    )


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged again after a resume keeps its newest row."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def logged_steps(run_dir: Path) -> list[int]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    return [r["step"] for r in rows if "event" not in r]  # not the goodput rows (events)


def wait_for_step(run_dir: Path, step: int, slurm, job: str) -> None:
    until(
        lambda: max(logged_steps(run_dir), default=0) >= step, slurm, run_dir, job, f"step {step}"
    )


def until(cond, slurm, run_dir: Path, job: str, what: str, timeout: float = 90) -> None:
    """Poll `cond` until the job ends (a requeue passes through REQUEUED, PENDING, ...)."""
    deadline = time.time() + timeout
    while not cond():
        state = slurm.job(job).get("JobState")
        assert state not in FINAL_STATES, (state, what, batch_log(run_dir, job))
        assert time.time() < deadline, (
            f"{what}: timed out\n{batch_log(run_dir, job)}\n{node_logs(run_dir)}"
        )
        time.sleep(0.1)


def finish(slurm, run_dir: Path, job: str, timeout: float = 150) -> dict[str, str]:
    try:
        return slurm.wait_job(job, timeout=timeout)
    except (AssertionError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{batch_log(run_dir, job)}\n{node_logs(run_dir)}") from None


def resumed_from(run_dir: Path, job: str, restart: int) -> str | None:
    """What rank 0 of attempt `restart` said it resumed from."""
    text = "".join(p.read_text() for p in (run_dir / "logs").glob(f"node-*-{job}-r{restart}.log"))
    m = re.search(r"resumed from (\S+)", text)
    return m.group(1) if m else None


@pytest.fixture(scope="module")
def whole_run(slurm, shards, tmp_path_factory):
    """The uninterrupted 2-node run the interrupted ones are compared with."""
    run_dir = tmp_path_factory.mktemp("slurm-whole") / "run"
    t0 = time.time()
    # All of each node's CPUs for its one task (passed on to the step by the script).
    job = submit(slurm, run_dir, shards, "checkpoint.interval=0", sbatch_args=["--cpus-per-task=2"])
    info = finish(slurm, run_dir, job)
    print(f"2-node run of {STEPS} steps: {time.time() - t0:.1f} s")
    return run_dir, job, info


def test_two_node_job_runs_every_step_on_two_ranks_one_per_node(whole_run):
    run_dir, job, info = whole_run
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    loss = losses(run_dir)
    assert loss[STEPS] < loss[1]
    # One torchrun per node, each with one process (a CPU node), in one world of two ranks.
    logs = {p.name: p.read_text() for p in (run_dir / "logs").glob("*.log")}
    assert sorted(logs) == [f"node-node1-{job}-r0.log", f"node-node2-{job}-r0.log"]
    for text in logs.values():
        assert "cpus_per_task=2 nproc_per_node=1" in text and "rendezvous=node1:" in text
    assert "dp_shard=2" in logs[f"node-node1-{job}-r0.log"] + logs[f"node-node2-{job}-r0.log"]
    assert f"rendezvous=node1:{20000 + int(job) % 10000}" in batch_log(run_dir, job)


def test_preemption_then_node_failure_each_requeue_and_the_job_resumes_to_the_same_losses(
    slurm, shards, whole_run, tmp_path
):
    """One job interrupted twice, then finished (one sequence, not a job per interruption:
    the reference and each resume are the same either way).
    1. Preemption: scancel --signal=USR1 --batch (what --signal=B:USR1@120 sends before the
       time limit): the trainer saves at the end of its step and exits 85, the script
       requeues the job, and the requeued attempt resumes from that checkpoint.
    2. Node failure: one emulated node crashes (its slurmd, step daemon and ranks SIGKILLed).
       Slurm ends the attempt NODE_FAIL and requeues it (--requeue); once the node is back the
       job resumes from the newest periodic checkpoint.
    The finished job has the uninterrupted run's losses, every step logged once."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    t0 = time.time()
    job = submit(slurm, run_dir, shards, "checkpoint.interval=5")
    wait_for_step(run_dir, 3, slurm, job)
    slurm.run(["scancel", "--signal=USR1", "--batch", job])
    until(lambda: resumed_from(run_dir, job, 1) is not None, slurm, run_dir, job, "attempt 1")
    # The preemption's save is the last one the first attempt made: the requeued attempt
    # starts right after the step the signal interrupted.
    first = "".join(p.read_text() for p in (run_dir / "logs").glob(f"node-*-{job}-r0.log"))
    saved = re.findall(r"checkpoint (\S+) saved", first)
    assert "exiting with status 85 (requeue)" in first and saved, node_logs(run_dir)
    assert resumed_from(run_dir, job, 1) == saved[-1], node_logs(run_dir)
    stop = int(re.search(r"step_(\d+)", saved[-1]).group(1))
    assert 3 <= stop < STEPS - 10

    # A periodic checkpoint of the requeued attempt is on disk (published whole: a step_*
    # directory appears by a rename once written); then node2 crashes.
    periodic = (stop // 5 + 1) * 5

    def saved_again() -> bool:
        return any(int(p.name[5:]) >= periodic for p in ckpts.glob("step_*"))

    until(saved_again, slurm, run_dir, job, f"a checkpoint at step {periodic} or later")
    killed = slurm.kill_node("node2")
    assert len(killed) >= 3  # slurmd, slurmstepd, torchrun (+ its worker)
    # The controller notices a silent node after SlurmdTimeout (30 s by default); marking it
    # DOWN now is the same verdict without the wait.
    slurm.run(["scontrol", "update", "NodeName=node2", "State=DOWN", "Reason=crashed"])
    deadline = time.time() + 60
    while time.time() < deadline and slurm.job(job).get("Restarts") != "2":
        time.sleep(0.2)
    info = slurm.job(job)
    assert info.get("Restarts") == "2", (info, batch_log(run_dir, job))
    # The machine comes back: slurmd registers and ReturnToService=2 puts it in service.
    slurm.start_node("node2")
    info = finish(slurm, run_dir, job)
    print(f"2-node run, preempted, then a node failure: {time.time() - t0:.1f} s")

    log = batch_log(run_dir, job)  # every attempt's (train.sbatch appends)
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", log
    assert "got SIGUSR1" in log and "requeueing job" in log, log
    resumed = resumed_from(run_dir, job, 2)
    assert resumed is not None, node_logs(run_dir)
    step = int(re.search(r"step_(\d+)", resumed).group(1))
    assert step % 5 == 0 and step >= periodic, resumed
    # Every step logged exactly once: rows past the checkpoint a resume starts from are cut.
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(whole_run[0])


def test_scancel_checkpoints_and_the_job_ends_cancelled_not_requeued(slurm, shards, tmp_path):
    """scancel signals the batch script and every step process with SIGTERM: the ranks save
    within KillWait, and the job ends CANCELLED; resubmitting the same command resumes."""
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, shards, "checkpoint.interval=0")
    wait_for_step(run_dir, 3, slurm, job)
    slurm.run(["scancel", job])
    deadline = time.time() + 30
    while time.time() < deadline and slurm.job(job).get("JobState") != "CANCELLED":
        time.sleep(0.2)
    info = slurm.job(job)
    # The job may read CANCELLED while its processes are still saving; wait for them.
    slurm.wait_steps_gone(job)
    log = batch_log(run_dir, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, log)
    assert "got SIGTERM" in log and "requeueing" not in log, log
    saved = [p.name for p in (run_dir / "checkpoints").glob("step_*")]
    assert len(saved) == 1, node_logs(run_dir)
    assert int(saved[0].removeprefix("step_")) == logged_steps(run_dir)[-1] >= 3


def test_a_run_dir_held_by_another_run_fails_the_job_with_87_and_is_not_requeued(
    slurm, shards, tmp_path
):
    """Another live run holds run_dir's lock: rank 0 is refused, every rank exits 87, and the
    script, reading torchrun's summary in the node logs, ends the job without a requeue."""
    import subprocess

    from tests.opt_train.test_write_faults import HOLD

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"host": "elsewhere", "pid": 999, "slurm_job_id": "99999", "started": "earlier"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir / "run.lock"), json.dumps(record)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        job = submit(slurm, run_dir, shards)
        try:
            info = slurm.wait_job(job, states=("FAILED",), timeout=150)
        except (AssertionError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{batch_log(run_dir, job)}\n{node_logs(run_dir)}") from None
    finally:
        holder.kill()
        holder.wait()
    log = batch_log(run_dir, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log)
    assert "training stopped with status 87" in log and "requeueing job" not in log, log
    assert "in use by another run (pid 999 on elsewhere, Slurm job 99999" in node_logs(run_dir)
    assert not (run_dir / "metrics.jsonl").exists()


# --- automatic loss-spike recovery (stability.*) ---------------------------------------------

FSDP2 = "parallel.dp_shard=2"


def test_a_two_node_job_rolls_back_on_every_rank_alike(
    slurm, garbage_corpus, two_rank_rollback, tmp_path
):
    """A garbage document (tests/opt_train/garbage.py) trips the detector on both nodes' ranks
    at the same step, both roll back to the same checkpoint, and the job's metrics equal the
    local two-rank run of the same config (tests/conftest.py's `two_rank_rollback`) bit for
    bit (each rank a node here, one process each on one thread)."""
    data, bad = garbage_corpus
    assert garbage_steps(data, bad, 21, 2, 24) == [23]
    run_dir = tmp_path / "slurm" / "run"
    run_dir.parent.mkdir()
    t0 = time.time()
    job = slurm.sbatch(
        [
            "--nodes=2",
            f"--output={run_dir.parent}/{run_dir.name}-%j.out",
            str(SBATCH),
            *stability_overrides(run_dir, data, *TWO_RANKS, FSDP2, *STABLE),
        ],
        env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
        cwd=REPO,
    )
    info = finish(slurm, run_dir, job)
    print(f"2-node run with a rollback: {time.time() - t0:.1f} s")
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", batch_log(run_dir, job)

    events = [r for r in metrics_rows(run_dir) if "event" in r and r["event"] != "goodput"]
    assert [(e["event"], e["step"]) for e in events] == [("spike", 23), ("rollback", 23)]
    assert (events[1]["to_step"], events[1]["skip_steps"]) == (20, [21, 23])
    got = step_rows(run_dir)
    assert sorted(got) == list(range(1, 25))  # every step once
    # Each node's rank said so itself (every rank logs warnings; the c10d rendezvous decides
    # which node's rank is 0).
    said = [
        re.findall(r"\[rank(\d)\] .*: step 23: loss spike .* rolled back to step 20", p.read_text())
        for p in sorted((run_dir / "logs").glob(f"node-*-{job}-r0.log"))
    ]
    assert sorted(said) == [["0"], ["1"]], node_logs(run_dir)

    # The same config on two local ranks: the same decisions and the same floats.
    local = two_rank_rollback(FSDP2)
    assert [r for r in metrics_rows(local) if "event" in r and r["event"] != "goodput"] == events
    want = step_rows(local)
    for s in range(1, 25):
        for key in ("loss", "grad_norm", "lr"):
            assert got[s][key] == want[s][key], (s, key)
