"""The data pipeline on a real Slurm: launch/slurm/submit-pipeline.sh + pipeline.sbatch
(tokenize as a job array over input files, then the merge job), and the stages' own
`executor=slurm` (datatrove job arrays, one per step): the same bytes as a local run, and a
task killed mid-way rerun alone."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from data_pipeline import shards
from data_pipeline.dedup import DedupConfig
from data_pipeline.dedup import run as dedup
from data_pipeline.reddit import RedditConfig
from data_pipeline.reddit import run as reddit
from data_pipeline.tokenize import TokenizeConfig
from data_pipeline.tokenize import run as tokenize
from tests.data_pipeline.pushshift_gen import write_random_dump
from tests.data_pipeline.test_dedup import split_corpus
from tests.data_pipeline.test_merge import write_inputs
from tests.data_pipeline.test_reddit import parts_bytes

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "slurm" / "submit-pipeline.sh"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_tokenize_array_then_merge_equals_one_tokenize_run(slurm, tmp_path):
    inputs = write_inputs(tmp_path / "in", files=5, docs=30)
    t0 = time.time()
    r = slurm.run(
        [
            str(SUBMIT),
            "tokenize",
            str(tmp_path / "work"),
            str(tmp_path / "merged"),
            str(tmp_path / "in" / "*.jsonl"),
            "--",
            "validation_fraction=0.2",
        ],
        env={"PYTHON": sys.executable, "FILES_PER_TASK": "2", "OMP_NUM_THREADS": "1"},
        cwd=REPO,
    )
    array, merge = r.stdout.split()
    logs = tmp_path / "work" / "logs"
    try:
        slurm.wait_job(merge, timeout=120)
    except (AssertionError, TimeoutError) as e:
        text = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(logs.glob("*")))
        raise AssertionError(f"{e}\n{text}") from None
    print(f"tokenize array (3 tasks) + merge: {time.time() - t0:.1f} s")

    # 5 files, 2 per task: tasks 0..2, each a shard set; all completed before the merge ran.
    assert (tmp_path / "work" / "inputs.txt").read_text().split() == [str(p) for p in inputs]
    states = slurm.array_states(array)
    assert sorted(states) == [f"{array}_{i}" for i in range(3)], states
    assert set(states.values()) == {"COMPLETED"}, states
    parts = sorted(p.name for p in (tmp_path / "work" / "parts").iterdir() if p.is_dir())
    assert parts == ["part-00000", "part-00001", "part-00002"]
    assert slurm.job(merge)["Dependency"] == "(null)"  # satisfied

    whole = tmp_path / "whole"
    tokenize(
        TokenizeConfig(input=[str(p) for p in inputs], output=str(whole), validation_fraction=0.2)
    )
    merged = tmp_path / "merged"
    shards.verify(merged)
    for split in ("train", "validation"):
        got = [d.tolist() for d in shards.iter_documents(merged, split)]
        want = [d.tolist() for d in shards.iter_documents(whole, split)]
        assert got == want and want
    assert len(shards.read_manifest(merged)["pipeline"]["upstream"]) == 3


def test_a_failed_array_task_cancels_the_merge(slurm, tmp_path):
    write_inputs(tmp_path / "in", files=2, docs=3)
    r = slurm.run(
        [
            str(SUBMIT),
            "tokenize",
            str(tmp_path / "work"),
            str(tmp_path / "merged"),
            str(tmp_path / "in"),
            "--",
            "validation_fraction=2.0",  # refused by the stage: every task fails
        ],
        env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
    )
    array, merge = r.stdout.split()
    deadline = time.time() + 60
    state = ""
    while time.time() < deadline:
        state = slurm.job(merge).get("JobState", "")
        if state not in ("PENDING", ""):
            break
        time.sleep(0.5)
    assert state == "CANCELLED", slurm.job(merge)
    assert not (tmp_path / "merged").exists()
    assert set(slurm.array_states(array).values()) == {"FAILED"}


# --- executor=slurm: the stages' own tasks as datatrove job arrays -----------------------------


def _stage_on_slurm(slurm, stage: str, args: list[str], timeout: float = 240):
    return slurm.run(
        [sys.executable, "-m", f"data_pipeline.{stage}", *args, "executor=slurm"],
        check=False,
        env={"OMP_NUM_THREADS": "1"},
        cwd=REPO,
        timeout=timeout,
    )


def _task_pid(job_id: str, task: int) -> int | None:
    """The Python process running array task `task` of job `job_id` (a descendant of a slurmd
    on this machine), found by its environment."""
    want = {f"SLURM_ARRAY_JOB_ID={job_id}".encode(), f"SLURM_ARRAY_TASK_ID={task}".encode()}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = set((d / "environ").read_bytes().split(b"\0"))
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if want <= env and b"launch_pickled_pipeline" in cmd and b"srun" not in cmd:
            return int(d.name)
    return None


def test_reddit_on_slurm_with_four_tasks_equals_the_local_run(slurm, tmp_path):
    write_random_dump(tmp_path / "in", 8000, seed=5)
    local = tmp_path / "local.jsonl"
    reddit(RedditConfig(input=str(tmp_path / "in"), output=str(local), num_buckets=16, tasks=1))
    out = tmp_path / "slurm"
    t0 = time.time()
    r = _stage_on_slurm(
        slurm, "reddit", [f"input={tmp_path / 'in'}", f"output={out}", "num_buckets=16", "tasks=4"]
    )
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"reddit on slurm, 4 map + 4 reduce + 1 report task: {time.time() - t0:.1f} s")
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{i}.jsonl.zst" for i in range(4)]
    assert parts_bytes(out) == local.read_bytes()
    report = json.loads(r.stdout)
    assert report["tasks"] == {"map": 4, "reduce": 4}


def test_reddit_task_killed_on_slurm_is_rerun_alone_and_output_is_unchanged(slurm, tmp_path):
    write_random_dump(tmp_path / "in", 40000, seed=6)
    local = tmp_path / "local.jsonl"
    reddit(RedditConfig(input=str(tmp_path / "in"), output=str(local), num_buckets=16, tasks=1))
    out = tmp_path / "slurm"
    work = tmp_path / ".slurm.work"
    args = [
        f"input={tmp_path / 'in'}",
        f"output={out}",
        "num_buckets=16",
        "flush_records=200",
        "tasks=4",
        "slurm.wait=false",
    ]
    r = _stage_on_slurm(slurm, "reddit", args)
    assert r.returncode == 0, r.stderr[-4000:]
    map_job = json.loads(r.stdout)["slurm_jobs"][0]
    # Kill map task 1 (RC_2020-02, a third of the comments) while it writes its buckets.
    # The process is found while Python starts (~1 s), then killed once its buckets appear.
    deadline, pid, killed = time.time() + 120, None, False
    while time.time() < deadline and not killed:
        if pid is None:
            pid = _task_pid(map_job, 1)
        elif any((work / "map").glob(".task-00001.tmp-*/bucket-*")):
            os.kill(pid, signal.SIGKILL)
            killed = True
        if (work / "map" / "task-00001").exists():
            break  # finished before it could be killed
        time.sleep(0.001)
    assert killed, f"map task 1 was not killed mid-way (pid {pid})"
    ids = json.loads(r.stdout)["slurm_jobs"]
    for j in ids:  # the reduce and report jobs are cancelled: their dependency failed
        deadline = time.time() + 120
        while slurm.job(j).get("JobState") in ("PENDING", "RUNNING", "COMPLETING", ""):
            assert time.time() < deadline, slurm.job(j)
            time.sleep(0.5)
    assert not out.exists()
    done = work / "executor" / "map" / "completions"
    assert sorted(p.name for p in done.iterdir()) == ["00000", "00002", "00003"]
    first = (work / "map" / "task-00000").stat().st_ino
    r = _stage_on_slurm(slurm, "reddit", [*args[:-1], "keep_work=true"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert parts_bytes(out) == local.read_bytes()
    assert (work / "map" / "task-00000").stat().st_ino == first  # not redone
    launched = json.loads((work / "executor" / "map" / "ranks_to_run.json").read_text())
    assert launched == [1]  # the re-run's map array held the killed task only


def test_dedup_on_slurm_with_four_tasks_equals_the_local_run(slurm, tmp_path):
    inp = split_corpus(tmp_path)
    local = tmp_path / "local.jsonl"
    want = dedup(DedupConfig(input=str(inp), output=str(local), tasks=1, progress=False))
    out = tmp_path / "slurm"
    t0 = time.time()
    r = _stage_on_slurm(
        slurm, "dedup", [f"input={inp}", f"output={out}", "tasks=4", "progress=false"]
    )
    assert r.returncode == 3, r.stderr[-4000:]  # finished; the corpus has rejected lines
    print(f"dedup on slurm, 4+4+1+4+1 tasks: {time.time() - t0:.1f} s")
    assert parts_bytes(out) == local.read_bytes()
    report = json.loads(r.stdout)
    assert report["tasks"] == {"signatures": 4, "buckets": 4, "clusters": 1, "filter": 4}
    for k in ("docs_in", "docs_out", "candidate_pairs", "clusters", "rejects"):
        assert report[k] == want[k], k


@pytest.mark.parametrize("stage", ["reddit", "dedup"])
def test_submit_pipeline_sends_reddit_and_dedup_to_their_own_slurm_executor(stage, tmp_path):
    """One array task per input file cuts threads at month boundaries and misses
    near-duplicates across files: the script refuses and names the command to use."""
    import subprocess

    r = subprocess.run(
        [str(SUBMIT), stage, str(tmp_path / "w"), str(tmp_path / "o"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert f"python -m data_pipeline.{stage}" in r.stderr and "executor=slurm" in r.stderr
    assert not (tmp_path / "w").exists()
