"""Reddit stage throughput and peak memory for two dump sizes: comments/s and peak RSS, showing
that memory stays flat as the dump grows (it follows the largest bucket, not the dump).

    python benchmarks/reddit.py                 # 1M and 2M comments (about 3 minutes on 2 cores)
    python benchmarks/reddit.py 200000 400000   # quicker

Each run is a fresh `python -m data_pipeline.reddit` process so its peak RSS (from os.wait4's
rusage) is its own. For contrast, the larger dump is also run with num_buckets=1, which holds
the whole dump in memory at once, as a one-pass in-memory implementation would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.data_pipeline.pushshift_gen import write_random_dump  # noqa: E402


def run_stage(inp: Path, out: Path, *extra: str) -> dict:
    """One stage process; returns its report plus wall time and peak RSS in MiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.reddit", f"input={inp}", f"output={out}", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"stage failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    report = json.loads(stdout)
    report["wall_s"] = wall
    report["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return report


def main() -> None:
    sizes = [int(x) for x in sys.argv[1:]] or [1_000_000, 2_000_000]
    with tempfile.TemporaryDirectory(prefix="reddit-bench-") as tmp:
        tmp = Path(tmp)
        rows = []
        for n in sizes:
            t0 = time.perf_counter()
            gen = write_random_dump(tmp / f"in{n}", n, seed=1)
            mb = sum(p.stat().st_size for p in (tmp / f"in{n}").iterdir()) / 2**20
            print(
                f"generated {gen['comments']:,} comments in {gen['threads']:,} threads "
                f"({mb:.0f} MiB zstd) in {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
            r = run_stage(tmp / f"in{n}", tmp / f"out{n}.jsonl", "tasks=1")
            rows.append((f"{n:,} comments, 1024 buckets", r))
            (tmp / f"out{n}.jsonl").unlink()
        n = sizes[-1]
        r = run_stage(tmp / f"in{n}", tmp / "one.jsonl", "num_buckets=1", "tasks=1")
        rows.append((f"{n:,} comments, 1 bucket (in memory)", r))

    print()
    # comments/s is the stage's own figure (map and reduce, without interpreter start-up);
    # wall s is the whole process.
    print(
        f"{'run':<38}{'comments/s':>12}{'map s':>9}{'reduce s':>9}{'wall s':>8}"
        f"{'peak RSS MiB':>14}{'threads':>10}{'reduction':>11}"
    )
    for name, r in rows:
        sec = r["timings_s"]
        print(
            f"{name:<38}{r['comments_per_s']:>12,.0f}{sec['map']:>9.1f}{sec['reduce']:>9.1f}"
            f"{r['wall_s']:>8.1f}{r['peak_rss_mib']:>14.0f}{r['threads_out']:>10,}"
            f"{r['size_reduction_percent']:>10.1f}%"
        )
    small, large = rows[0][1], rows[len(sizes) - 1][1]
    print()
    print(
        f"dump grew x{large['comments_in'] / small['comments_in']:.2f}: "
        f"peak RSS x{large['peak_rss_mib'] / small['peak_rss_mib']:.2f}, "
        f"comments/s x{large['comments_per_s'] / small['comments_per_s']:.2f}; "
        f"in-memory (1 bucket) RSS x{rows[-1][1]['peak_rss_mib'] / large['peak_rss_mib']:.2f} "
        f"of the bucketed run"
    )


if __name__ == "__main__":
    main()
