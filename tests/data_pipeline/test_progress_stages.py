"""Every data stage reports each task's progress the same way (data_pipeline.runtime.progress): with
stderr going to a file, plain lines with the bytes (or documents) done, rate and ETA, no '\r'."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_pipeline.pushshift_gen import write_random_dump

REPO = Path(__file__).resolve().parents[2]
# "clean task 1/2: 10.5 KiB of 21.0 KiB (50.0%) | 1.2 MiB/s | ETA 0:00:00 | elapsed 0:00:00"
LINE = re.compile(r"^(?P<desc>[a-z ]+ task \d+/\d+): .+ \(\d+\.\d%\) \| .+/s \| ETA \S+ \| elapsed")


def docs_dir(root: Path, files: int = 2, docs: int = 300) -> Path:
    root.mkdir(parents=True)
    for k in range(files):
        with open(root / f"f{k}.jsonl", "w") as f:
            for i in range(docs):
                text = f"file {k} document {i}: " + "some words of text " * (5 + i % 9)
                f.write(json.dumps({"text": text, "id": f"{k}-{i}"}) + "\n")
    return root


@pytest.mark.parametrize("stage", ["clean", "tokenize", "dedup", "reddit"])
def test_a_stage_logging_to_a_file_writes_plain_progress_lines_for_every_task(stage, tmp_path):
    if stage == "reddit":
        write_random_dump(tmp_path / "in", 2000, seed=3)
        assert len(list((tmp_path / "in").iterdir())) >= 2
    else:
        docs_dir(tmp_path / "in")
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", f"data_pipeline.{stage}", f"input={tmp_path / 'in'}",
             f"output={tmp_path / 'out'}", "tasks=2", "workers=1", "progress_interval_s=0"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = text.splitlines()
    first_step = {"clean": "clean", "tokenize": "tokenize", "dedup": "dedup signatures",
                  "reddit": "reddit map"}[stage]  # fmt: skip
    for rank in (0, 1):
        desc = f"{first_step} task {rank}/2"
        progress = [m for m in map(LINE.match, lines) if m and m["desc"] == desc]
        assert progress, f"no progress line for {desc} in:\n{text[-3000:]}"
        assert any(line.startswith(f"{desc}: done, ") for line in lines), desc
    # the last line of a task's first file: its share's bytes, at most 100%
    assert all(float(m) <= 100.0 for m in re.findall(r"\((\d+\.\d)%\)", text))


def test_the_chain_logging_to_a_file_reports_its_steps_and_each_tasks_progress(tmp_path):
    docs_dir(tmp_path / "in")
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "data_pipeline", f"work_dir={tmp_path / 'work'}",
             f"sources=[{{name: web, input: {tmp_path / 'in'}}}]", "steps=[clean]",
             "tasks=2", "workers=1", "progress_interval_s=0"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = text.splitlines()
    # ingest web, clean web, tokenize: three steps
    assert [x for x in lines if x.startswith("chain: ") and "ETA" in x][-1].startswith(
        "chain: 3/3 steps (100.0%)"
    )
    assert any(x.startswith("chain: done, 3 steps in ") for x in lines)
    # two input files: ingest writes two parts, so every step has two shares
    for desc in ("ingest web task 1/2", "clean task 1/2", "tokenize task 1/2"):
        assert any(LINE.match(x) and x.startswith(desc) for x in lines), desc
