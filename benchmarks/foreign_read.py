"""Window reads from foreign token data against our own shards: what the loader pays per
`seq_len + 1` window (`PackedWindows.window`, random windows as a shuffled epoch reads them)
for each format `data.path` accepts, as a ratio to our shards in the same run.

The same documents (random ids, lengths 20-400) are written as our shards, as a Megatron
prefix whose documents end in the separator (datatrove's MegatronDocumentTokenizer with
`eos_token`, `--append-eod`), as a datatrove `.ds` without separators (DocumentTokenizer's
default: the loader appends them) and as a saved HF dataset. Foreign data holds out
`data.validation_fraction` (default 0.001) of the documents, so its train split is not the file.

    python benchmarks/foreign_read.py [--tokens 10000000] [--seq-len 2048] [--windows 3000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)  # benchmarks/tokenize*.py would shadow the standard library's tokenize

from data_pipeline.formats import ReadOptions, datatrove, megatron  # noqa: E402
from data_pipeline.shards import ShardWriter  # noqa: E402
from opt_train.data.loader import PackedWindows  # noqa: E402

EOS = 2


def documents(tokens: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs, n = [], 0
    while n < tokens:
        d = rng.integers(3, 50265, int(rng.integers(20, 400)), dtype=np.uint16)
        docs.append(d)
        n += len(d) + 1
    return docs


def write_all(root: Path, docs: list[np.ndarray]) -> dict[str, Path]:
    tok = {"name": "opt", "vocab_size": 50265, "eos_id": EOS}
    with ShardWriter(root / "ours", tok) as w:
        for d in docs:
            w.add(d)
    (root / "megatron").mkdir()
    with_eos = [np.append(d, np.uint16(EOS)) for d in docs]
    np.concatenate(with_eos).tofile(root / "megatron" / "m.bin")
    megatron.write_index(root / "megatron" / "m.idx", np.uint16, [len(d) for d in with_eos])
    (root / "datatrove").mkdir()
    np.concatenate(docs).tofile(root / "datatrove" / "d.ds")
    datatrove.write_index(root / "datatrove" / "d.ds.index", np.cumsum([len(d) for d in docs]))
    import datasets

    datasets.Dataset.from_dict({"input_ids": [d.tolist() for d in docs]}).save_to_disk(
        str(root / "hf")
    )
    return {k: root / k for k in ("ours", "megatron", "datatrove", "hf")}


def us_per_window(windows: PackedWindows, picks: np.ndarray) -> float:
    for w in picks[:50]:  # warm the page cache and the code paths
        windows.window(int(w))
    t0 = time.perf_counter()
    for w in picks:
        windows.window(int(w))
    return (time.perf_counter() - t0) / len(picks) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=3000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        docs = documents(args.tokens)
        paths = write_all(Path(tmp), docs)
        opts = ReadOptions("opt")
        rng = np.random.default_rng(1)
        base = None
        for name, path in paths.items():
            windows = PackedWindows(path, "train", args.seq_len, opts)
            picks = rng.integers(0, len(windows), args.windows)
            us = us_per_window(windows, picks)
            base = base or us
            print(f"{name:10s} {len(docs):7d} docs  {us:8.1f} us/window  {us / base:5.2f}x ours")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
