"""Dedup end to end, as whole processes on the same corpus: data_pipeline.dedup against
datasketch and rensa's bulk API, docs/s, CPU seconds and the recall each reaches on the planted
near-duplicates.

    python benchmarks/dedup.py [--docs 105000] [--workers 2] [--dup-rate 0.05] [--rounds 3]
    python benchmarks/dedup.py --docs 1000000 --rounds 1 --peers ours   # the slope at 1M

Each contender is one `python` process started by this script, timed from its start to its
exit (wall) with its CPU seconds (its own and its children's): imports, start-up and writing
the output all count, as a user running the command sees them.

- ours: `python -m data_pipeline.dedup input=DIR output=FILE tasks=<files> workers=<workers>`
  (the defaults: exact pass, 18 x 7 banding, exact verification). Before timing, one small
  run loads (on a machine's first run, compiles) the numba kernels into numba's disk cache;
  loading them from there is part of every timed run.
- datasketch: read the JSONL, `MinHash.bulk` over word 5-grams (128 permutations), then
  `MinHashLSH(threshold=0.95)`: query each document, drop it when the index returns a match,
  insert it otherwise; write the kept documents.
- rensa-bulk: read the JSONL, word 5-grams, `RMinHashDeduplicator(threshold=0.95,
  num_perm=128, use_lsh=True).add_pairs` over all documents at once (Rust: MinHash, LSH and
  the decision in one call); write the kept documents.

The corpus is written as `--workers` files (ours runs one signature task per file). It is
real English (CPython's pydoc topics and the standard library's docstrings) recombined into
~3 KB documents: each a random run of sentences, so documents have the statistics of prose
but rarely share 5-grams by chance. A fraction (`--dup-rate`) are planted near-duplicates of
earlier documents (one word changed, or a few words trimmed: word-5-gram Jaccard >= 0.97).
A run on 1,000 documents (`--fixed-docs`) gives ours' fixed per-run cost, so the per-document
slope at `--docs` is printed beside the whole-process rate.
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
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def read_texts(inp: Path) -> list[str]:
    return [
        json.loads(line)["text"]
        for path in sorted(inp.iterdir())
        for line in open(path, encoding="utf-8")
    ]


def grams(text: str) -> list[str]:
    w = text.split()
    return [" ".join(w[i : i + 5]) for i in range(len(w) - 4)]


def write_kept(out: Path, texts: list[str], removed: set[int]) -> None:
    with open(out, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            if i not in removed:
                f.write(json.dumps({"text": t, "id": str(i), "meta": {}}) + "\n")


def peer_datasketch(inp: Path, out: Path) -> None:
    from datasketch import MinHash, MinHashLSH

    texts = read_texts(inp)
    sigs = MinHash.bulk(([g.encode() for g in grams(t)] for t in texts), num_perm=128)
    lsh = MinHashLSH(threshold=0.95, num_perm=128)
    removed = set()
    for i, m in enumerate(sigs):
        if lsh.query(m):
            removed.add(i)
            continue
        lsh.insert(i, m)
    write_kept(out, texts, removed)


def peer_rensa(inp: Path, out: Path) -> None:
    from rensa import RMinHashDeduplicator

    texts = read_texts(inp)
    dedup = RMinHashDeduplicator(threshold=0.95, num_perm=128, use_lsh=True)
    added = dedup.add_pairs([(str(i), grams(t)) for i, t in enumerate(texts)])
    write_kept(out, texts, {i for i, ok in enumerate(added) if not ok})


PEERS = {"datasketch": peer_datasketch, "rensa": peer_rensa}


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of `cmd` as a process (its children included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def run_one(name: str, inp: Path, out: Path, workers: int) -> tuple[set[int], float, float]:
    """(removed document numbers, wall s, CPU s) of one contender as a whole process."""
    out.unlink(missing_ok=True)
    if name == "ours":
        files = len(list(inp.iterdir()))
        cmd = [sys.executable, "-m", "data_pipeline.dedup", f"input={inp}", f"output={out}"]
        cmd += [f"tasks={files}", f"workers={workers}", "progress=false"]
    else:
        cmd = [sys.executable, __file__, "--peer", name, "--input", str(inp), "--output", str(out)]
    wall, cpu = timed(cmd)
    kept = {int(json.loads(line)["id"]) for line in open(out, encoding="utf-8")}
    n = sum(1 for p in inp.iterdir() for _ in open(p, "rb"))
    return set(range(n)) - kept, wall, cpu


def write_corpus(inp: Path, docs: list[str], files: int) -> None:
    inp.mkdir()
    n = len(docs)
    for k in range(files):
        with open(inp / f"part{k:03d}.jsonl", "w", encoding="utf-8") as f:
            for i in range(k * n // files, (k + 1) * n // files):
                f.write(json.dumps({"text": docs[i], "id": str(i), "meta": {}}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=105000)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--dup-rate", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every contender in turn")
    ap.add_argument("--peers", default="ours,datasketch,rensa")
    ap.add_argument("--fixed-docs", type=int, default=1000)
    ap.add_argument("--peer", choices=sorted(PEERS), help=argparse.SUPPRESS)
    ap.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:  # one contender's process, started by the benchmark itself
        PEERS[args.peer](args.input, args.output)
        return
    names = args.peers.split(",")
    docs, planted = make_corpus(args.docs, args.dup_rate)
    mean_kb = sum(len(d.encode()) for d in docs) / len(docs) / 1000
    n = len(docs)

    def recall(removed: set[int]) -> float:
        # a planted pair is caught when one of the two is removed (the copy comes later)
        return sum(a in removed or b in removed for a, b in planted) / max(len(planted), 1)

    with tempfile.TemporaryDirectory() as tmp:
        inp, small = Path(tmp) / "corpus", Path(tmp) / "small"
        write_corpus(inp, docs, max(args.workers, 1))
        write_corpus(small, docs[: args.fixed_docs], max(args.workers, 1))
        run_one("ours", small, Path(tmp) / "warm.jsonl", args.workers)  # numba's disk cache
        mb = sum(p.stat().st_size for p in inp.iterdir()) / 1e6
        print(f"corpus: {n} docs ({mb:.0f} MB), {mean_kb:.2f} KB mean, {len(planted)} planted")
        print(f"cpus: {os.cpu_count()}, ours: tasks={args.workers} workers={args.workers}")
        print("round  load  " + "  ".join(f"{x:>22}" for x in names) + "   (wall s / cpu s)")
        res: dict[str, list] = {x: [] for x in names}
        fixed = []
        for r in range(args.rounds):  # contenders in turn, so all see the same load
            load = os.getloadavg()[0]
            for x in names:
                res[x].append(run_one(x, inp, Path(tmp) / f"{x}.jsonl", args.workers))
            if "ours" in names:
                fixed.append(run_one("ours", small, Path(tmp) / "fixed.jsonl", args.workers)[1])
            cells = [f"{res[x][-1][1]:9.2f} / {res[x][-1][2]:8.2f}" for x in names]
            print(f"{r + 1:5d} {load:5.2f}  " + "  ".join(f"{c:>22}" for c in cells))
    wall = {x: statistics.median(w for _, w, _ in res[x]) for x in names}
    cpu = {x: statistics.median(c for _, _, c in res[x]) for x in names}
    print(f"load now: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for x in names:
        ratio = ""
        if "ours" in names and x != "ours":
            ratio = f", ours is {wall[x] / wall['ours']:.1f}x wall, {cpu[x] / cpu['ours']:.1f}x cpu"
        print(
            f"{x:>10}: median {wall[x]:.2f} s wall ({n / wall[x]:,.0f} docs/s), "
            f"{cpu[x]:.2f} cpu-s, removed {len(res[x][-1][0])}, "
            f"recall {recall(res[x][-1][0]):.3f}{ratio}"
        )
    if fixed:
        f = statistics.median(fixed)
        slope = (wall["ours"] - f) / max(n - args.fixed_docs, 1)
        print(
            f"ours, fixed cost: {f:.2f} s wall for {args.fixed_docs} docs; slope above it "
            f"{1e6 * slope:.1f} us/doc ({1 / slope if slope > 0 else 0:,.0f} docs/s)"
        )


if __name__ == "__main__":
    main()
