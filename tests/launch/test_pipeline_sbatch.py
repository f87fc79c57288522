"""launch/slurm/submit-pipeline.sh + pipeline.sbatch on a real Slurm: tokenize as a job array
over input files, then the merge job (afterok) gives one run's shard set."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from data_pipeline import shards
from data_pipeline.tokenize import TokenizeConfig
from data_pipeline.tokenize import run as tokenize
from tests.data_pipeline.test_merge import write_inputs

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
