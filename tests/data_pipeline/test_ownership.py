"""The pipeline deletes or replaces only what it provably wrote, and no process of a stage
outlives its driver: real stages on real files, real stage processes killed by real signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from data_pipeline.chain import ChainConfig, CorpusConfig
from data_pipeline.chain import run as run_chain
from data_pipeline.ownership import NotOursError, claim_work, remove_work
from data_pipeline.runtime import scaleout
from data_pipeline.stages.clean import CleanConfig
from data_pipeline.stages.clean import run as run_clean
from data_pipeline.stages.dedup import DedupConfig
from data_pipeline.stages.dedup import run as run_dedup
from data_pipeline.stages.reddit import RedditConfig
from data_pipeline.stages.reddit import run as run_reddit
from data_pipeline.stages.tokenize import TokenizeConfig
from data_pipeline.stages.tokenize import run as run_tokenize

from .conftest import assert_no_stage_processes
from .pushshift_gen import write_random_dump

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def write_docs(path: Path, n: int, words: int = 30, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(f"w{(i * 7919 + k * 31 + seed) % 5000}" for k in range(words))
            f.write(json.dumps({"text": f"Doc  {i}\n\n\n{text}  ", "id": f"s{seed}-{i}"}) + "\n")
    return path


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) -> sha256 of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}  # fmt: skip


def stage(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def users_work_dir(tmp_path: Path) -> tuple[Path, dict]:
    scratch = tmp_path / "scratch"
    (scratch / "mine").mkdir(parents=True)
    (scratch / "notes.txt").write_text("the user's notes\n")
    (scratch / "mine" / "data.bin").write_bytes(os.urandom(1000))
    return scratch, tree_digest(scratch)


# --- work_dir= is a parent: only the stage's own subdirectory is ever removed ----------------


@pytest.mark.parametrize("name", ["clean", "tokenize", "reddit", "dedup"])
def test_a_users_files_in_work_dir_survive_a_successful_stage(tmp_path, name):
    scratch, before = users_work_dir(tmp_path)
    docs = write_docs(tmp_path / "in" / "a.jsonl", 200)
    out = tmp_path / "out.jsonl"
    if name == "clean":
        run_clean(CleanConfig(input=str(docs), output=str(out), work_dir=str(scratch)))
    elif name == "tokenize":
        out = tmp_path / "tokens"
        run_tokenize(TokenizeConfig(input=str(docs), output=str(out), work_dir=str(scratch)))
    elif name == "reddit":
        write_random_dump(tmp_path / "dump", 300, seed=1)
        cfg = RedditConfig(input=str(tmp_path / "dump"), output=str(out), work_dir=str(scratch))
        run_reddit(cfg)
    else:
        run_dedup(DedupConfig(input=str(docs), output=str(out), work_dir=str(scratch)))
    assert out.exists()
    assert tree_digest(scratch) == before  # the private subdirectory went, nothing else


def test_a_work_dir_subdirectory_that_is_not_ours_is_refused_and_kept(tmp_path):
    docs = write_docs(tmp_path / "a.jsonl", 50)
    scratch = tmp_path / "scratch"
    taken = scratch / "opt-train-clean.work"  # the name the stage would use, but the user's
    taken.mkdir(parents=True)
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(NotOursError, match="opt-train-clean.work.*keep.txt"):
        run_clean(CleanConfig(input=str(docs), output=str(tmp_path / "o.jsonl"),
                              work_dir=str(scratch)))  # fmt: skip
    assert (taken / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o.jsonl").exists()


def test_removing_a_work_dir_unlinks_a_symlink_inside_and_never_follows_it(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("precious")
    work = tmp_path / "w"
    claim_work(work, "clean")
    (work / "link").symlink_to(elsewhere, target_is_directory=True)
    remove_work(work)
    assert not work.exists()
    assert (elsewhere / "precious.txt").read_text() == "precious"
    unmarked = tmp_path / "unmarked"  # no marker: not ours, never removed
    unmarked.mkdir()
    (unmarked / "x").write_text("x")
    remove_work(unmarked)
    assert (unmarked / "x").read_text() == "x"


# --- output=: replaced only when it carries the project's mark -------------------------------


def users_output(tmp_path: Path, kind: str) -> tuple[Path, dict]:
    if kind == "file":
        out = tmp_path / "out.jsonl"
        out.write_text('{"mine": true}\n')
    else:
        out = tmp_path / "shards"
        for name in ("a", "b"):
            (out / name).mkdir(parents=True)
            (out / name / "data.bin").write_bytes(os.urandom(100))
        (out / "notes.txt").write_text("notes")
    return out, tree_digest(out)


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_clean_refuses_an_output_that_is_not_ours_and_leaves_it_byte_identical(tmp_path, kind):
    docs = write_docs(tmp_path / "in.jsonl", 50)
    out, before = users_output(tmp_path, kind)
    r = stage("data_pipeline.clean", f"input={docs}", f"output={out}")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert f"output={out} exists and is not an opt-train output" in last
    assert ("file of 15 bytes" if kind == "file" else "3 entries: a/, b/, notes.txt") in last
    assert "Traceback" not in r.stderr
    assert tree_digest(out) == before
    assert not out.with_name(out.name + ".report.json").exists()


def test_tokenize_and_merge_refuse_a_directory_of_other_datasets(tmp_path):
    docs = write_docs(tmp_path / "in.jsonl", 50)
    out, before = users_output(tmp_path, "dir")
    r = stage("data_pipeline.tokenize", f"input={docs}", f"output={out}")
    assert r.returncode == 1 and "is not an opt-train output" in r.stderr, r.stderr[-2000:]
    part = tmp_path / "part"
    assert stage("data_pipeline.tokenize", f"input={docs}", f"output={part}").returncode == 0
    r = stage("data_pipeline.merge", f"input=[{part}]", f"output={out}")
    assert r.returncode == 1
    assert f"output={out} exists and is not an opt-train output (holds 3 entries" in r.stderr
    assert tree_digest(out) == before
    # A shard set the project made is replaced, as before.
    assert stage("data_pipeline.merge", f"input=[{part}]", f"output={part}-m").returncode == 0
    r = stage("data_pipeline.merge", f"input=[{part}]", f"output={part}-m")
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_chain_refuses_an_output_that_is_not_ours(tmp_path):
    docs = write_docs(tmp_path / "in.jsonl", 50)
    out, before = users_output(tmp_path, "dir")
    cfg = ChainConfig(work_dir=str(tmp_path / "work"), output=str(out),
                      sources=[CorpusConfig(name="s", input=str(docs))], steps=["clean"],
                      workers=1, progress=False)  # fmt: skip
    with pytest.raises(NotOursError, match="is not an opt-train output"):
        run_chain(cfg)
    assert tree_digest(out) == before


def test_a_project_made_output_is_replaced_on_rerun(tmp_path):
    docs = tmp_path / "in"
    for k in range(3):
        write_docs(docs / f"{k}.jsonl", 40, seed=k)
    out = tmp_path / "parts"
    run_clean(CleanConfig(input=str(docs), output=str(out), tasks=3, workers=1))
    assert len(list(out.iterdir())) == 3
    run_clean(CleanConfig(input=str(docs), output=str(out), tasks=1, workers=1))
    assert [p.name for p in out.iterdir()] == ["part-00000.jsonl.zst"]


# --- process hygiene and the lock ------------------------------------------------------------


def big_input(tmp_path: Path) -> Path:
    """Four files a `tasks=4 workers=2` clean takes seconds over (the kill lands mid-run)."""
    d = tmp_path / "in"
    for k in range(4):
        write_docs(d / f"{k}.jsonl", 12_000, words=120, seed=k)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_driver_leaves_no_process_and_an_immediate_rerun_gives_the_same_bytes(
    tmp_path, sig
):
    inp = big_input(tmp_path)
    args = [f"input={inp}", "tasks=4", "workers=2", "progress=false"]
    ref = tmp_path / "ref"
    assert stage("data_pipeline.clean", *args, f"output={ref}").returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.clean", *args, f"output={out}"],
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: everything it starts is found by it
    )  # fmt: skip
    parts = tmp_path / ".out.work" / "parts"
    deadline = time.monotonic() + 120
    while not any(parts.glob(".part-*.tmp-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "finished before it could be killed; make the input bigger"
        time.sleep(0.005)
    os.kill(proc.pid, sig)  # the driver only, as a scheduler or an OOM killer would
    proc.wait(timeout=60)
    assert_no_stage_processes(proc.pid, within_s=5.0)
    r = stage("data_pipeline.clean", *args, f"output={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_digest(out) == {k.replace("ref/", "out/"): v for k, v in tree_digest(ref).items()}


def test_a_second_concurrent_run_of_the_same_output_is_refused_by_the_lock(tmp_path):
    docs = write_docs(tmp_path / "in.jsonl", 50)
    out = tmp_path / "o.jsonl"
    plan = SimpleNamespace(out=out, work=tmp_path / ".o.jsonl.work")
    with scaleout.owned(plan, "clean"):  # a run holding the work directory
        t = time.monotonic()
        r = stage("data_pipeline.clean", f"input={docs}", f"output={out}")
        waited = time.monotonic() - t
    assert r.returncode == 1
    assert f"output={out}: another run (pid {os.getpid()}) is writing it" in r.stderr
    assert waited >= scaleout.LOCK_WAIT_S
    assert not out.exists()
    assert stage("data_pipeline.clean", f"input={docs}", f"output={out}").returncode == 0


# --- datatrove's own log lines go to the work directory unless verbose=true --------------------


def test_datatrove_logs_go_to_the_work_directory_and_to_stderr_only_with_verbose(tmp_path):
    docs = write_docs(tmp_path / "in.jsonl", 50)
    out = tmp_path / "o.jsonl"
    r = stage("data_pipeline.clean", f"input={docs}", f"output={out}", "keep_work=true")
    assert r.returncode == 0
    assert "PIPELINE" not in r.stderr and "datatrove" not in r.stderr, r.stderr
    assert "clean task 0/1: done" in r.stderr  # the stage's own progress lines stay
    logs = tmp_path / ".o.jsonl.work" / "executor" / "clean"
    assert "Launching pipeline for rank=0" in (logs / "logs" / "task_00000.log").read_text()
    assert "All 1 tasks" in (logs / "driver.log").read_text()
    r = stage("data_pipeline.clean", f"input={docs}", f"output={out}2", "verbose=true")
    assert r.returncode == 0 and "PIPELINE" in r.stderr


def test_the_tiny_corpus_build_says_what_it_built_in_one_line(tmp_path):
    code = (
        "from data_pipeline.tiny_corpus import build_tiny_shards as b; import sys; b(sys.argv[1])"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiny corpus: built 3,000 documents"), lines
    assert f"into {tmp_path / 'tokens'} in " in lines[0]
