"""Scale-out of the reddit and dedup stages and of the whole chain on ONE source: the same
corpus at workers=1 and workers=2 (and more where the machine has the cores), per step: wall
docs/s (or comments/s), docs per CPU-second of its tasks, and the peak RSS of a task.

    python benchmarks/pipeline_scaling.py                       # 600k comments, 24k docs
    python benchmarks/pipeline_scaling.py --comments 200000 --docs 8000 --workers 1 2 4
    python benchmarks/pipeline_scaling.py --parts chain --chain-files 8

The chain part runs `python -m data_pipeline` (ingest, clean, dedup, tokenize) on one source,
the dedup corpus written as `--chain-files` files, with tasks=4: each step's wall seconds
(the chain report's), the whole process's docs/s and MB/s, and whether the token shards of
every worker count are the same bytes.

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
    ap.add_argument("--parts", nargs="+", default=["reddit", "dedup", "chain"],
                    choices=["reddit", "dedup", "chain"])  # fmt: skip
    ap.add_argument("--chain-files", type=int, default=8)
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="pipeline-scaling-") as tmp:
        tmp = Path(tmp)
        gen = {"comments": 0}
        if "reddit" in args.parts:
            gen = write_random_dump(tmp / "dumps", args.comments, seed=1, months=4)
        docs, _ = make_corpus(args.docs, 0.05)
        (tmp / "docs").mkdir()
        for k in range(4):
            with open(tmp / "docs" / f"part{k}.jsonl", "w", encoding="utf-8") as f:
                for i in range(k * len(docs) // 4, (k + 1) * len(docs) // 4):
                    f.write(json.dumps({"text": docs[i], "id": str(i)}) + "\n")
        if "reddit" in args.parts:
            print(f"reddit: {gen['comments']:,} comments, 4 monthly RC_ files + RS_ files")
        if "dedup" in args.parts:
            print(f"dedup: {len(docs):,} docs of ~3 KB in 4 files")
        if {"reddit", "dedup"} & set(args.parts):
            print(f"\n{'stage':<8}{'step':<12}{'workers':>8}{'wall s':>9}{'items/s':>11}"
                  f"{'items/cpu-s':>13}{'max RSS MiB':>13}")  # fmt: skip
        digests: dict[str, set] = {"reddit": set(), "dedup": set(), "chain": set()}
        for w in args.workers:
            if "reddit" not in args.parts:
                break
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
        for w in args.workers:
            if "dedup" not in args.parts:
                break
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
        if "chain" in args.parts:
            digests["chain"] = chain_rows(tmp, docs, args.chain_files, args.workers)
    print()
    for name, d in digests.items():
        if d:
            print(f"{name}: outputs of every worker count identical: {len(d) == 1}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def chain_rows(tmp: Path, docs: list[str], files: int, workers: list[int]) -> set:
    """The chain on one source of `files` files at tasks=4, once per worker count: each
    step's wall seconds and the whole process's rates; returns the token shards' digests."""
    src = tmp / "one-source"
    src.mkdir()
    for k in range(files):
        with open(src / f"part{k:02d}.jsonl", "w", encoding="utf-8") as f:
            for i in range(k * len(docs) // files, (k + 1) * len(docs) // files):
                f.write(json.dumps({"text": docs[i], "id": str(i)}) + "\n")
    mb = sum(p.stat().st_size for p in src.iterdir()) / 1e6
    print(f"\nchain: ONE source, {len(docs):,} docs ({mb:.1f} MB) in {files} files, tasks=4")
    print(f"{'chain step':<20}{'workers':>8}{'wall s':>9}{'tasks':>7}")
    digests = set()
    for w in workers:
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "data_pipeline", f"work_dir={tmp / f'chain{w}'}",
             f"sources=[{{name: web, input: {src}}}]", "steps=[clean,dedup]", "tasks=4",
             f"workers={w}", "progress=false"],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        total = time.perf_counter() - t0
        if r.returncode not in (0, 3):
            raise SystemExit(f"chain failed ({r.returncode}): {r.stderr[-3000:]}")
        for st in json.loads(r.stdout)["steps"]:
            out = Path(st["output"])
            rep = json.loads(out.with_name(out.name + ".report.json").read_text())
            tasks = rep.get("tasks", 1)  # an ingest before it was split had no key
            tasks = tasks["signatures"] if isinstance(tasks, dict) else tasks
            print(f"{st['stage'] + ':' + st['label']:<20}{w:>8}{st['seconds']:>9.2f}{tasks:>7}")
        print(f"{'(process)':<20}{w:>8}{total:>9.2f}   {len(docs) / total:,.0f} docs/s, "
              f"{mb / total:.2f} MB/s")  # fmt: skip
        h = hashlib.sha256()
        for p in sorted((tmp / f"chain{w}" / "tokens").glob("*.tokens")):
            h.update(p.read_bytes())
        digests.add(h.hexdigest()[:16])
    return digests


if __name__ == "__main__":
    main()
