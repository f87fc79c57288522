"""What the layout before the restructure wrote still loads: a token-shard directory made by its
tokenize stage, and a run_dir with a step-2 checkpoint made by its `python train.py`, both from
commit 6d308f6 (tests/fixtures/README.md says how they were made)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.shards import iter_documents, read_manifest, verify

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "compat-6d308f6"

# The old run's command line, relative paths and all: data.path can never change on resume (the
# resume guard compares it as written), so the copy is run from its own directory.
OLD_RUN = [
    "run_dir=run",
    "data.path=shards",
    "precision=fp32",
    "checkpoint.interval=2",
    "model.n_layers=1",
    "model.n_heads=1",
    "model.d_model=2",
    "model.max_positions=32",
    "data.seq_len=16",
    "train.batch_tokens=64",
    "logging.wandb=disabled",
]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_old_shard_directory_reads_back_as_its_manifest_records():
    verify(FIXTURE / "shards")  # every file's sha256 as the old manifest recorded it
    manifest = read_manifest(FIXTURE / "shards")
    assert manifest["tokenizer"]["name"] == "gpt2" and manifest["dtype"] == "uint16"
    for split in ("train", "validation"):
        recorded = manifest["splits"][split]
        docs = list(iter_documents(FIXTURE / "shards", split))
        assert len(docs) == recorded["num_documents"] > 0
        # each stored document is followed by one separator (`</s>`, eos_id)
        assert sum(len(d) + 1 for d in docs) == recorded["num_tokens"]
        stream = np.concatenate(docs)
        assert stream.max() < manifest["vocab_size"]
        assert not np.any(stream == manifest["eos_id"])  # separators excluded, as documented


@pytest.mark.slow
def test_old_checkpoint_resumes_at_step_2_and_continues_as_the_old_code_did(tmp_path):
    work = tmp_path / "compat"
    shutil.copytree(FIXTURE, work)
    old_rows = rows(work / "run" / "metrics.jsonl")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *OLD_RUN, "train.max_steps=4"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    *new_rows, ledger = rows(work / "run" / "metrics.jsonl")
    # The run's last row is its goodput ledger: the old checkpoint holds none, so the ledger
    # counts from this resume, whose start-up is a restart's.
    assert (ledger["event"], ledger["step"], ledger["goodput/processes"]) == ("goodput", 4, 1)
    assert ledger["goodput/restart_s"] > 0 and ledger["goodput/startup_s"] == 0
    assert new_rows[:2] == old_rows  # the old rows stay; the resume appends after them
    assert new_rows[2] == {
        "event": "config_change",
        "step": 2,
        "key": "train.max_steps",
        "old": 2,
        "new": 4,
    }
    assert [r["step"] for r in new_rows[3:]] == [3, 4]
    # The old code run uninterrupted to step 4: the resumed steps are its steps 3 and 4, so
    # weights, optimizer state, data position and RNG all came back from the old checkpoint.
    reference = {r["step"]: r for r in rows(FIXTURE / "reference-metrics.jsonl")}
    for r in new_rows[3:]:
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert r[key] == pytest.approx(reference[r["step"]][key], rel=1e-5), (r["step"], key)
    assert (work / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
