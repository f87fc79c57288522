"""benchmarks/gpu.py keeps working: its CPU dry run goes through every section with the same
code the GPU run uses, and the correctness rows pass (on CPU they compare the code paths:
FSDP2 on one rank against the plain module, bf16 against fp32, compiled against eager)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_prints_every_section_and_the_correctness_rows_pass(tmp_path):
    rows_file = tmp_path / "rows.json"
    # A budget no loaded CI machine reaches, so no row is skipped for time here.
    cmd = [sys.executable, "benchmarks/gpu.py", "--dry-run", "--budget-s", "1200"]
    cmd += ["--dir", str(tmp_path), "--json", str(rows_file)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    lines = r.stdout.splitlines()
    head = lines.index("| section | case | measured | target | pass |")
    assert lines[head + 1] == "|---|---|---|---|---|"
    printed = [line for line in lines[head + 2 :] if line.startswith("| ")]
    assert len(printed) == len(rows)  # one table, one line per row
    for line, row in zip(printed, rows, strict=True):
        assert line.startswith(f"| {row['section']} | {row['case']} |")

    by = {s: [row for row in rows if row["section"] == s] for s in {x["section"] for x in rows}}
    assert set(by) == {"correctness", "speed", "baseline", "checkpoint"}
    assert not [row for row in rows if row["passed"] in ("skipped", "NO")]

    correctness = by["correctness"]
    assert len(correctness) == 3 and all(row["passed"] == "yes" for row in correctness)
    # bf16 really differs from fp32 (the comparison is not of a run with itself).
    bf16 = next(row for row in correctness if "bf16" in row["case"])
    assert 0 < bf16["value"] <= 2e-2

    speed = {(row["compile"], row["ac"]) for row in by["speed"]}
    assert speed == {(True, "off"), (False, "off"), (False, "selective"), (False, "full")}
    for row in by["speed"]:
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and row["plan_gib"] > 0
    (baseline,) = by["baseline"]
    assert baseline["hf_tokens_per_s"] > 0 and baseline["ratio"] > 0
    (ckpt,) = by["checkpoint"]
    assert ckpt["bytes"] > 0 and 0 < ckpt["blocked_s"] <= ckpt["visible_s"]
    assert ckpt["pinned"] is False  # CPU weights: plain memory (pinning needs CUDA)
