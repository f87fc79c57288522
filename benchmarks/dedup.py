"""Dedup end to end, docs/s: data_pipeline.stages.dedup against datasketch on the same corpus, in one
run, plus the recall each reaches on the planted near-duplicates.

    python benchmarks/dedup.py [--docs 20000] [--workers 2] [--dup-rate 0.05] [--rounds 3]

The corpus is written as `--workers` files: ours runs one signature (and filter) task per
file, `--workers` of them at once (tasks are how the stage uses cores); datasketch reads the
same files in order.

The corpus is real English (CPython's pydoc topics and the standard library's docstrings)
recombined into ~3 KB documents: each document is a random run of sentences, so documents
have the statistics of prose but rarely share 5-grams by chance. A fraction (`--dup-rate`) are
planted near-duplicates of earlier documents (one word changed, or a few words trimmed: exact
word-5-gram Jaccard >= 0.97).

Baseline: read the JSONL, `MinHash.bulk` over word 5-grams
(128 permutations), then `MinHashLSH(threshold=0.95)`: query each document, drop it when the
index returns a match, insert it otherwise; write the kept documents. Ours: the whole stage
(`data_pipeline.stages.dedup.run`), reading and writing the same files. The numba kernels are
loaded (compiled on a machine's first run) before timing; that one-off cost is excluded.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pydoc_data.topics
import random
import re
import resource
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path


def sentences() -> list[str]:
    text = [t for _, t in sorted(pydoc_data.topics.topics.items())]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        text += [d for n in ast.walk(tree) if isinstance(n, kinds) and (d := ast.get_docstring(n))]
    out = []
    for t in text:
        out += [s for s in re.split(r"(?<=[.!?])\s+", " ".join(t.split())) if len(s) > 20]
    return out


def make_corpus(n_docs: int, dup_rate: float, seed: int = 0) -> tuple[list[str], list[tuple]]:
    rng = random.Random(seed)
    sents = sentences()
    docs, planted = [], []
    while len(docs) < n_docs:
        if docs and rng.random() < dup_rate:
            src = rng.randrange(len(docs))
            w = docs[src].split()
            if rng.random() < 0.5:
                w[rng.randrange(len(w))] = f"changed{rng.randrange(10**6)}"
            else:
                w = w[: len(w) - rng.randint(1, 5)]
            planted.append((src, len(docs)))
            docs.append(" ".join(w))
            continue
        parts, size = [], 0
        while size < 3000:
            s = sents[rng.randrange(len(sents))]
            parts.append(s)
            size += len(s) + 1
        docs.append(" ".join(parts))
    return docs, planted


def datasketch_dedup(inp: Path, out: Path) -> tuple[set[int], float, float]:
    from datasketch import MinHash, MinHashLSH

    t0, c0 = time.perf_counter(), cpu_seconds()
    texts = [
        json.loads(line)["text"]
        for path in sorted(inp.iterdir())
        for line in open(path, encoding="utf-8")
    ]

    def grams(text: str) -> list[bytes]:
        w = text.split()
        return [" ".join(w[i : i + 5]).encode("utf-8") for i in range(len(w) - 4)]

    sigs = MinHash.bulk((grams(t) for t in texts), num_perm=128)
    lsh = MinHashLSH(threshold=0.95, num_perm=128)
    removed = set()
    with open(out, "w", encoding="utf-8") as f:
        for i, m in enumerate(sigs):
            if lsh.query(m):
                removed.add(i)
                continue
            lsh.insert(i, m)
            f.write(json.dumps({"text": texts[i], "id": str(i), "meta": {}}) + "\n")
    return removed, time.perf_counter() - t0, cpu_seconds() - c0


def ours_dedup(inp: Path, out: Path, workers: int) -> tuple[set[int], float, float, dict]:
    from data_pipeline.stages.dedup import DedupConfig, run

    cfg = DedupConfig(input=str(inp), output=str(out), workers=workers, progress=False)
    cfg.tasks = len(list(inp.iterdir()))
    t0, c0 = time.perf_counter(), cpu_seconds()
    report = run(cfg)
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    # outside the timed span: reading back which documents were kept is the benchmark's work
    kept = {int(json.loads(line)["id"]) for line in open(out, encoding="utf-8")}
    return set(range(report["docs_in"])) - kept, elapsed, cpu, report


def uptime() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (our workers): unlike wall time it
    does not depend on what else the machine is running."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dup-rate", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of baseline, then ours")
    args = ap.parse_args()

    from data_pipeline.kernels import minhash

    docs, planted = make_corpus(args.docs, args.dup_rate)
    mean_kb = sum(len(d.encode()) for d in docs) / len(docs) / 1000
    n = len(docs)

    def recall(removed: set[int]) -> float:
        # a planted pair is caught when one of the two is removed (the copy comes later)
        return sum(a in removed or b in removed for a, b in planted) / max(len(planted), 1)

    rows, sig_us = [], []
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "corpus"
        inp.mkdir()
        files = max(args.workers, 1)
        for k in range(files):
            with open(inp / f"part{k:03d}.jsonl", "w", encoding="utf-8") as f:
                for i in range(k * n // files, (k + 1) * n // files):
                    f.write(json.dumps({"text": docs[i], "id": str(i), "meta": {}}) + "\n")
        # Load (on a machine's first run, compile) every numba kernel before timing anything:
        # a small run of the whole stage, untimed.
        warm = Path(tmp) / "warm"
        warm.mkdir()
        (warm / "w.jsonl").write_bytes(
            b"".join((inp / "part000.jsonl").open("rb").readlines()[:300])
        )
        ours_dedup(warm, Path(tmp) / "warm-out.jsonl", args.workers)
        print(f"corpus: {n} docs, {mean_kb:.2f} KB mean, {len(planted)} planted dups")
        print(f"cpus: {os.cpu_count()}, ours: workers={args.workers}, sha1={minhash.SHA1_IMPL}")
        print("round  load  datasketch wall/cpu-s   ours wall/cpu-s (docs/s)   ratio wall  cpu")
        # Rounds alternate baseline and ours, so both see the same load on a shared machine.
        for r in range(args.rounds):
            ds_removed, ds_s, ds_cpu = datasketch_dedup(inp, Path(tmp) / "ds.jsonl")
            our_removed, our_s, our_cpu, report = ours_dedup(
                inp, Path(tmp) / "ours.jsonl", args.workers
            )
            rows.append((ds_s / our_s, ds_cpu / our_cpu))
            sig_us.append(1e6 * report["cpu_s"]["signatures"] / n)
            print(
                f"{r + 1:5d} {os.getloadavg()[0]:5.2f}  {n / ds_s:8.0f} / {n / ds_cpu:6.0f}"
                f"          {n / our_s:8.0f} / {n / our_cpu:6.0f}"
                f"              {ds_s / our_s:5.1f}x {ds_cpu / our_cpu:5.1f}x"
            )
    wall = statistics.median(w for w, _ in rows)
    cpu = statistics.median(c for _, c in rows)
    print(f"median ratio: {wall:.1f}x wall, {cpu:.1f}x per cpu-s; load now: {uptime()}")
    print(f"datasketch: removed {len(ds_removed)}, recall {recall(ds_removed):.3f}")
    print(f"ours:       removed {len(our_removed)}, recall {recall(our_removed):.3f}")
    print(f"ours, seconds per stage (last round): {report['timings_s']}")
    print(f"ours, cpu-s per stage, tasks summed (last round): {report['cpu_s']}")
    print(
        f"ours, signature pass: {statistics.median(sig_us):.1f} us CPU per document (median;"
        f" rounds: {', '.join(f'{u:.1f}' for u in sig_us)})"
    )
    print(
        f"ours: candidates {report['candidate_pairs']}, verified {report['verified_pairs']},"
        f" clusters {report['clusters']}, banding {report['banding']['bands']}x"
        f"{report['banding']['rows']}"
    )


if __name__ == "__main__":
    main()
