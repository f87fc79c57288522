"""Decontamination throughput: the scan against an evaluation index, next to a clean pass over
the same corpus (the same JSONL read and write, one task, one worker).

    python benchmarks/decontaminate.py [--mb 20] [--eval-texts 2000] [--repeat 2]

The corpus is the Python standard library's sources cut into ~3 KB documents, repeated up to
`--mb` MB; the evaluation texts are `--eval-texts` 60-word windows of those documents (so some
documents match) written as one JSONL file. Printed: MB/s and documents/s of clean and of
decontaminate (action=remove, 13-grams), their ratio, the index build's seconds and the
documents found, with the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sysconfig
import tempfile
import time
from pathlib import Path

from data_pipeline.stages import clean, decontaminate


def corpus(mb: float) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    pieces = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        pieces += [text[i : i + 3000] for i in range(0, len(text), 3000) if text[i:].strip()]
    docs, size = [], 0
    while size < mb * 1e6:
        for p in pieces:
            docs.append(p)
            size += len(p.encode())
            if size >= mb * 1e6:
                break
    return docs


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--eval-texts", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    docs = corpus(args.mb)
    rng = random.Random(0)
    evals = []
    for _ in range(args.eval_texts):
        words = re.findall(r"\S+", rng.choice(docs))
        start = rng.randrange(max(1, len(words) - 60))
        evals.append({"text": " ".join(words[start : start + 60]), "task": "bench"})
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        inp = write(d / "corpus.jsonl", [{"text": t, "id": str(i)} for i, t in enumerate(docs)])
        ev = write(d / "eval.jsonl", evals)
        mb = inp.stat().st_size / 1e6
        common = dict(input=str(inp), tasks=1, workers=1, progress=False)
        c = min(
            timed(lambda: clean.run(clean.CleanConfig(output=str(d / "c.jsonl"), **common)))
            for _ in range(args.repeat)
        )
        cfg = decontaminate.DecontaminateConfig(
            output=str(d / "x.jsonl"), eval=str(ev), action="remove", **common
        )
        x = min(timed(lambda: decontaminate.run(cfg)) for _ in range(args.repeat))
        report = decontaminate.run(cfg)
        t = time.perf_counter()
        from data_pipeline.stages.decontaminate import eval_index

        eval_index.build(cfg)
        build = time.perf_counter() - t
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB; eval: {args.eval_texts} texts")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    print(f"clean          {mb / c:7.2f} MB/s  {len(docs) / c:9.0f} docs/s")
    print(f"decontaminate  {mb / x:7.2f} MB/s  {len(docs) / x:9.0f} docs/s  ({x / c:.2f}x clean)")
    print(f"index build    {build:.2f} s for {report['eval']['bench']['ngrams']} n-grams")
    print(f"found          {report['docs_contaminated']} documents, {report['ngram_hits']} hits")


if __name__ == "__main__":
    main()
