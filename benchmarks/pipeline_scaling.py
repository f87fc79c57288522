"""Scale-out of the reddit and dedup stages: the same corpus at workers=1 and workers=2 (and
more where the machine has the cores), per step: wall docs/s (or comments/s), docs per
CPU-second of its tasks, and the peak RSS of a task.

    python benchmarks/pipeline_scaling.py                       # 600k comments, 24k docs
    python benchmarks/pipeline_scaling.py --comments 200000 --docs 8000 --workers 1 2 4

Both stages run with tasks=4 (reddit: 4 map, 4 reduce; dedup: 4 signature, 4 bucket, 1
cluster, 4 filter tasks) on datatrove's LocalPipelineExecutor, each run in a fresh process.
The outputs of every run are compared byte for byte with the workers=1 run. Per-CPU-second
rates come from each task's own process time, so they do not depend on how many tasks shared
the machine; wall rates do. The dedup corpus is benchmarks/dedup.py's (real English, ~3 KB
documents, 5% planted near-duplicates), written as 4 files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.dedup import make_corpus  # noqa: E402
from tests.data_pipeline.pushshift_gen import write_random_dump  # noqa: E402


def stage(name: str, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", f"data_pipeline.{name}", *args, "tasks=4"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if r.returncode not in (0, 3):
        raise SystemExit(f"{name} failed ({r.returncode}): {r.stderr[-3000:]}")
    return json.loads(r.stdout)


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("part-*")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comments", type=int, default=600_000)
    ap.add_argument("--docs", type=int, default=24_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="pipeline-scaling-") as tmp:
        tmp = Path(tmp)
        gen = write_random_dump(tmp / "dumps", args.comments, seed=1, months=4)
        docs, _ = make_corpus(args.docs, 0.05)
        (tmp / "docs").mkdir()
        for k in range(4):
            with open(tmp / "docs" / f"part{k}.jsonl", "w", encoding="utf-8") as f:
                for i in range(k * len(docs) // 4, (k + 1) * len(docs) // 4):
                    f.write(json.dumps({"text": docs[i], "id": str(i)}) + "\n")
        print(f"reddit: {gen['comments']:,} comments, 4 monthly RC_ files + RS_ files")
        print(f"dedup: {len(docs):,} docs of ~3 KB in 4 files")
        print()
        print(f"{'stage':<8}{'step':<12}{'workers':>8}{'wall s':>9}{'items/s':>11}"
              f"{'items/cpu-s':>13}{'max RSS MiB':>13}")  # fmt: skip
        digests: dict[str, set] = {"reddit": set(), "dedup": set()}
        for w in args.workers:
            t0 = time.perf_counter()
            r = stage("reddit", f"input={tmp / 'dumps'}", f"output={tmp / f'rd{w}'}",
                      f"workers={w}")  # fmt: skip
            total = time.perf_counter() - t0
            n = r["comments_in"]
            for step in ("map", "reduce"):
                wall, cpu = r["step_seconds"][step], r["cpu_s"][step]
                print(f"{'reddit':<8}{step:<12}{w:>8}{wall:>9.2f}{n / wall:>11,.0f}"
                      f"{n / cpu:>13,.0f}{r['max_rss_mb'][step]:>13.0f}")  # fmt: skip
            print(f"{'reddit':<8}{'(process)':<12}{w:>8}{total:>9.2f}{n / total:>11,.0f}")
            digests["reddit"].add(digest(tmp / f"rd{w}"))
            t0 = time.perf_counter()
            r = stage("dedup", f"input={tmp / 'docs'}", f"output={tmp / f'dd{w}'}",
                      f"workers={w}", "progress=false")  # fmt: skip
            total = time.perf_counter() - t0
            n = r["docs_in"]
            for step in ("signatures", "buckets", "clusters", "filter"):
                wall, cpu = r["step_seconds"][step], r["cpu_s"][step]
                print(f"{'dedup':<8}{step:<12}{w:>8}{wall:>9.2f}{n / wall:>11,.0f}"
                      f"{n / max(cpu, 1e-9):>13,.0f}{r['max_rss_mb'][step]:>13.0f}")  # fmt: skip
            print(f"{'dedup':<8}{'(process)':<12}{w:>8}{total:>9.2f}{n / total:>11,.0f}")
            sig_us = 1e6 * r["cpu_s"]["signatures"] / n
            print(f"dedup signature pass: {sig_us:.1f} us CPU per document (workers={w})")
            digests["dedup"].add(digest(tmp / f"dd{w}"))
    print()
    for name, d in digests.items():
        print(f"{name}: outputs of every worker count identical: {len(d) == 1}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
