"""The data pipeline on a real Slurm: the stages' own `executor=slurm` (datatrove job arrays,
one per step) give the same bytes as a local run, and a task killed mid-way is rerun alone.

Two tasks a step: each array task is a Python process of its own (~1 s of CPU to start), and
two already split every input and every merge across tasks; the same stages split three or
four ways on the local executor are tests/data_pipeline's (test_reddit, test_dedup,
test_clean, test_tokenize, test_chain)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.stages.clean import CleanConfig
from data_pipeline.stages.clean import run as clean
from data_pipeline.stages.dedup import DedupConfig
from data_pipeline.stages.dedup import run as dedup
from data_pipeline.stages.reddit import RedditConfig
from data_pipeline.stages.reddit import run as reddit
from data_pipeline.stages.tokenize import TokenizeConfig
from data_pipeline.stages.tokenize import run as tokenize
from tests.data_pipeline.pushshift_gen import write_random_dump
from tests.data_pipeline.test_clean import write_jsonl
from tests.data_pipeline.test_dedup import split_corpus
from tests.data_pipeline.test_merge import write_inputs
from tests.data_pipeline.test_reddit import parts_bytes

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


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


def test_reddit_on_slurm_with_two_tasks_equals_the_local_run(slurm, tmp_path):
    write_random_dump(tmp_path / "in", 8000, seed=5)
    local = tmp_path / "local.jsonl"
    reddit(RedditConfig(input=str(tmp_path / "in"), output=str(local), num_buckets=16, tasks=1))
    out = tmp_path / "slurm"
    t0 = time.time()
    r = _stage_on_slurm(
        slurm, "reddit", [f"input={tmp_path / 'in'}", f"output={out}", "num_buckets=16", "tasks=2"]
    )
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"reddit on slurm, 2 map + 2 reduce + 1 report task: {time.time() - t0:.1f} s")
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{i}.jsonl.zst" for i in range(2)]
    assert parts_bytes(out) == local.read_bytes()
    report = json.loads(r.stdout)
    assert report["tasks"] == {"map": 2, "reduce": 2}


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
        "tasks=2",
        "slurm.wait=false",
    ]
    r = _stage_on_slurm(slurm, "reddit", args)
    assert r.returncode == 0, r.stderr[-4000:]
    map_job = json.loads(r.stdout)["slurm_jobs"][0]
    # Kill map task 1 (half of the dump's files) while it writes its buckets.
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
    assert sorted(p.name for p in done.iterdir()) == ["00000"]
    first = (work / "map" / "task-00000").stat().st_ino
    r = _stage_on_slurm(slurm, "reddit", [*args[:-1], "keep_work=true"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert parts_bytes(out) == local.read_bytes()
    assert (work / "map" / "task-00000").stat().st_ino == first  # not redone
    launched = json.loads((work / "executor" / "map" / "ranks_to_run.json").read_text())
    assert launched == [1]  # the re-run's map array held the killed task only


def test_dedup_on_slurm_with_two_tasks_equals_the_local_run(slurm, tmp_path):
    inp = split_corpus(tmp_path)
    local = tmp_path / "local.jsonl"
    want = dedup(DedupConfig(input=str(inp), output=str(local), tasks=1, progress=False))
    out = tmp_path / "slurm"
    t0 = time.time()
    r = _stage_on_slurm(
        slurm, "dedup", [f"input={inp}", f"output={out}", "tasks=2", "progress=false"]
    )
    assert r.returncode == 3, r.stderr[-4000:]  # finished; the corpus has rejected lines
    print(f"dedup on slurm, 2+1+2+1+2+1 tasks: {time.time() - t0:.1f} s")
    assert parts_bytes(out) == local.read_bytes()
    report = json.loads(r.stdout)
    assert report["tasks"] == {
        "signatures": 2,
        "exact": 1,
        "buckets": 2,
        "clusters": 1,
        "filter": 2,
    }
    for k in ("docs_in", "docs_out", "candidate_pairs", "clusters", "rejects"):
        assert report[k] == want[k], k


def test_clean_on_slurm_with_two_tasks_equals_the_local_run(slurm, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(4):  # two files a task: headings, spaces and blank runs to clean, bad lines
        write_jsonl(
            inp / f"f{k}.jsonl", [f"Chapter {i}\n\nFile {k},  {i}.  \n\n\n" for i in range(40)]
        )
        with open(inp / f"f{k}.jsonl", "a") as f:
            f.write('{"text": ""}\nnot json\n')
    local = tmp_path / "local.jsonl"
    want = clean(CleanConfig(input=str(inp), output=str(local), tasks=1, progress=False))
    out = tmp_path / "slurm"
    t0 = time.time()
    r = _stage_on_slurm(slurm, "clean", [f"input={inp}", f"output={out}", "tasks=2"])
    assert r.returncode == 3, r.stderr[-4000:]  # finished; the corpus has rejected lines
    print(f"clean on slurm, 2 clean + 1 report task: {time.time() - t0:.1f} s")
    assert parts_bytes(out) == local.read_bytes()
    report = json.loads(r.stdout)
    assert report["tasks"] == 2
    for k in ("docs_in", "docs_out", "docs_changed", "rules", "rejects", "chars_out"):
        assert report[k] == want[k], k
    assert report["rejects"]["total"] == 8
    assert (tmp_path / "slurm.rejects.jsonl").read_bytes() == (
        tmp_path / "local.jsonl.rejects.jsonl"
    ).read_bytes()


def test_tokenize_on_slurm_with_two_tasks_equals_the_local_run(slurm, tmp_path):
    write_inputs(tmp_path / "in", files=5, docs=30)
    with open(tmp_path / "in" / "in-02.jsonl", "a") as f:
        f.write("not json\n")
    out = tmp_path / "shards"
    args = [f"input={tmp_path / 'in'}", f"output={out}", "validation_fraction=0.2"]
    local = tokenize(TokenizeConfig(input=str(tmp_path / "in"), output=str(out), tasks=1,
                                    validation_fraction=0.2))  # fmt: skip
    want = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    want_rejects = (tmp_path / "shards.rejects.jsonl").read_bytes()
    shutil.rmtree(out)
    t0 = time.time()
    r = _stage_on_slurm(slurm, "tokenize", [*args, "tasks=2"])
    assert r.returncode == 3, r.stderr[-4000:]  # finished, one line rejected
    print(f"tokenize on slurm, 2 tokenize + 1 merge task: {time.time() - t0:.1f} s")
    report = json.loads((tmp_path / "shards.report.json").read_text())
    assert report["tasks"] == 2
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == want
    assert (tmp_path / "shards.rejects.jsonl").read_bytes() == want_rejects
    assert report["rejects"] == local["rejects"] and report["rejects"]["total"] == 1
    for k in ("documents_in", "splits"):
        assert report[k] == local[k], k


def test_the_chain_on_slurm_splits_one_source_at_every_step_with_the_local_tokens(slurm, tmp_path):
    """`python -m data_pipeline executor=slurm` with ONE source of 8 files at tasks=2: every
    step's job arrays hold 2 tasks (ingest, clean, dedup's signatures, tokenize), and the token
    shards are the bytes of a local tasks=1 run."""
    from data_pipeline.chain import ChainConfig, CorpusConfig
    from data_pipeline.chain import run as chain
    from tests.data_pipeline.test_chain import one_source_of_8_files, step_tasks, token_files

    src = one_source_of_8_files(tmp_path)
    chain(ChainConfig(work_dir=str(tmp_path / "one"), tasks=1, progress=False,
                      sources=[CorpusConfig(name="web", input=str(src))], steps=["clean", "dedup"],
                      tokenize={"validation_fraction": 0.1}))  # fmt: skip
    t0 = time.time()
    r = slurm.run(
        [sys.executable, "-m", "data_pipeline", f"work_dir={tmp_path / 'slurm'}",
         f"sources=[{{name: web, input: {src}}}]", "steps=[clean,dedup]", "tasks=2",
         "executor=slurm", "progress=false", "tokenize.validation_fraction=0.1"],
        check=False, env={"OMP_NUM_THREADS": "1"}, cwd=REPO, timeout=480,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"chain on slurm, 2 tasks a step: {time.time() - t0:.1f} s")
    assert step_tasks(tmp_path / "slurm") == dict.fromkeys(step_tasks(tmp_path / "one"), 2)
    assert token_files(tmp_path / "one" / "tokens") == token_files(tmp_path / "slurm" / "tokens")
