"""Ingest: one source read once into the chain's work directory, tagged with its name.

Every document gets `meta.source = <name>` and its id prefixed by `<name>/`, so ids stay unique
across sources and tokenize's `weights` find each source's documents. Later stages read the
corpus more than once (dedup makes two passes), so a streamed Hugging Face source is fetched
only here.

The stage runs as tasks (data_pipeline.runtime.scaleout), each reading a contiguous share of the
source's pieces (its local JSONL files, a streamed HF source's file shards: sources.pieces) into
its part; the output is a directory of the parts (or, for `output=x.jsonl.zst`, one file), the
same bytes for any split, so the stages after it get as many files to share as ingest had tasks.

`include` / `exclude` keep or drop documents by their metadata, e.g. the Pile's subsets:

    include: {pile_set_name: [Pile-CC, Wikipedia (en)]}   # only these values pass
    exclude: {pile_set_name: [Enron Emails]}              # these values are dropped

A key is a field of the document's `meta` (`a.b` for a nested one; a leading `meta.` is
allowed). A document passes when, for every include key, its value is one listed (a document
without the field is dropped), and, for no exclude key, its value is one listed. The report
counts what was kept and, per reason, what was dropped, and lists included values no document
had (a misspelt subset name keeps nothing of it, silently otherwise).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from data_pipeline.documents import INPUT_LIMITS, AtomicWriter, InputLimits, Rejects
from data_pipeline.files import publish_file, temporary_beside
from data_pipeline.runtime import executors, scaleout
from data_pipeline.runtime.cli import rejects_path, to_container, write_report
from data_pipeline.runtime.plan import BYTES_PER_TASK, StagePlan, file_fingerprint
from data_pipeline.sources import iter_piece_documents, local_files, pieces, plain

# Distinct dropped values listed per key in the report; the rest are counted under "<other>"
# (a filter on a high-cardinality field such as a URL must not grow the report without end).
_MAX_VALUES = 200


@dataclass
class IngestConfig(scaleout.ScaleOut):
    """A chain step's keys (the chain sets input, output, source and the scale-out keys)."""

    input: Any = MISSING
    output: str = MISSING
    source: str = MISSING
    include: Any = None  # {meta key: [values]}: keep only documents with one of the values
    exclude: Any = None  # {meta key: [values]}: drop documents with one of the values
    work_dir: str | None = None  # the parent of opt-train-ingest.work/; unset: beside output
    keep_work: bool = False


def check_filter(spec: Any, where: str) -> dict[tuple[str, ...], set]:
    """An include/exclude mapping as {key path: allowed values}; a bad one is refused naming
    `where` (e.g. `sources.pile.include`) and the key."""
    spec = plain(spec)
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping {{meta key: [values]}}, got {spec!r}")
    out = {}
    for key, values in spec.items():
        path = str(key).removeprefix("meta.").split(".")
        if not all(path):
            raise ValueError(f"{where}.{key}: not a meta field name")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
        bad = [v for v in values if not isinstance(v, (str, int, float, bool))]
        if bad:
            raise ValueError(f"{where}.{key}: values must be strings or numbers, got {bad!r}")
        out[tuple(path)] = set(values)
    return out


_ABSENT = object()


def _field(meta: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(meta, dict) or k not in meta:
            return _ABSENT
        meta = meta[k]
    return meta if isinstance(meta, (str, int, float, bool)) else _ABSENT


class DocFilter:
    """The include/exclude rules of one source; `reason(meta)` is None for a kept document,
    else why it is dropped. Counts what it dropped, and the included values it saw."""

    def __init__(self, include: Any, exclude: Any, where: str):
        self.include = check_filter(include, f"{where}.include")
        self.exclude = check_filter(exclude, f"{where}.exclude")
        self.dropped: Counter = Counter()
        self.values: dict[str, Counter] = {}
        self.seen: dict[str, set] = {".".join(p): set() for p in self.include}

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def reason(self, meta: dict) -> str | None:
        for path, allowed in self.include.items():
            v = _field(meta, path)
            if v is _ABSENT:
                return self._drop(f"include {'.'.join(path)}: field missing", path, None)
            if v not in allowed:
                return self._drop(f"include {'.'.join(path)}: value not listed", path, v)
            self.seen[".".join(path)].add(v)
        for path, banned in self.exclude.items():
            v = _field(meta, path)
            if v is not _ABSENT and v in banned:
                return self._drop(f"exclude {'.'.join(path)}: value listed", path, v)
        return None

    def _drop(self, reason: str, path: tuple[str, ...], value: Any) -> str:
        self.dropped[reason] += 1
        if value is not None:
            c = self.values.setdefault(".".join(path), Counter())
            c[str(value) if len(c) < _MAX_VALUES or str(value) in c else "<other>"] += 1
        return reason


class _Plan(StagePlan):
    """The source's pieces (local files, HF file shards) and their shares, the filter checked."""

    stage = "ingest"

    def __init__(self, cfg: IngestConfig):
        DocFilter(cfg.include, cfg.exclude, cfg.source)  # refuses a bad filter before any work
        super().__init__(cfg)
        self.pieces = pieces(cfg.input)
        # A hub shard's size is not known up front: count it as one task's worth.
        sizes = [p["size"] if p["size"] is not None else BYTES_PER_TASK for p in self.pieces]
        self.tasks, self.shares = self.split(sizes, "input files or dataset shards")

    def fingerprint(self) -> dict:
        params = {k: v for k, v in to_container(self.cfg).items() if k in _OUTPUT_PARAMS}
        hf = [{k: p[k] for k in ("hf", "shard", "shards")} for p in self.pieces if "hf" in p]
        files = file_fingerprint(local_files(self.cfg.input))
        return {"files": files, "hf": hf, "tasks": self.tasks, **params}


# The keys that decide what is written (the rest: where, and how it runs).
_OUTPUT_PARAMS = ("input", "source", "include", "exclude", *INPUT_LIMITS)


class IngestShare(scaleout.TaskStep):
    """Task r reads its contiguous share of the pieces into part r."""

    name = "ingest"

    def task(self, rank: int, world_size: int) -> dict:
        plan, cfg = self.plan, self.plan.cfg
        lo, hi = plan.shares[rank]
        keep = DocFilter(cfg.include, cfg.exclude, cfg.source)
        part = plan.part(rank)
        scaleout.remove_stale(part.parent, f".{part.name}.tmp-*")  # of a killed attempt
        final = scaleout.task_file(self.work, self.name, rank, ".rejects.jsonl")
        tmp = temporary_beside(final)
        rejects = Rejects(tmp, InputLimits.of(cfg))
        mine = plan.pieces[lo:hi]
        # Bytes of local files; with a streamed hub shard among them, documents.
        by_docs = any(p["size"] is None or "hf" in p for p in mine)
        total = None if by_docs else sum(p["size"] for p in mine)
        bar = scaleout.progress(cfg, f"ingest {cfg.source} task {rank}/{world_size}", total,
                                "doc" if by_docs else "B")  # fmt: skip
        st: Counter = Counter()
        try:
            with AtomicWriter(part) as w, bar:
                for piece in mine:
                    for doc in iter_piece_documents(piece, rejects, None if by_docs else bar):
                        if by_docs:
                            bar.update(1)
                        st["documents_in"] += 1
                        if keep and keep.reason(doc["meta"]) is not None:
                            continue
                        doc["id"] = f"{cfg.source}/{doc['id']}"
                        doc["meta"] = {**doc["meta"], "source": cfg.source}
                        w.write_doc(doc)
                        st["documents"] += 1
                        st["text_chars"] += len(doc["text"])
        finally:
            rejects.close()
        if tmp.exists():
            publish_file(tmp, final)
        return {
            **st,
            "dropped": dict(keep.dropped),
            "dropped_values": {k: dict(v) for k, v in keep.values.items()},
            "seen": {k: sorted(v, key=str) for k, v in keep.seen.items()},
            "rejects": rejects.report(),
        }


class IngestReport(scaleout.TaskStep):
    """One task: the report (every task's counts summed), the rejects in input order, and the
    parts published as the output."""

    name = "report"

    def task(self, rank: int, world_size: int) -> dict:
        plan, cfg = self.plan, self.plan.cfg
        st = scaleout.task_stats(self.work, "ingest", plan.tasks)
        rejects = scaleout.gather_rejects(
            [scaleout.task_file(self.work, "ingest", r, ".rejects.jsonl")
             for r in range(plan.tasks)],
            [t["rejects"] for t in st],
            rejects_path(plan.out),
        )  # fmt: skip
        scaleout.finish_parts([plan.part(r) for r in range(plan.tasks)], plan.out, plan.to_file)
        report = {
            "stage": "ingest",
            "source": cfg.source,
            "output": str(plan.out),
            "tasks": plan.tasks,
            **{
                k: sum(t.get(k, 0) for t in st) for k in ("documents_in", "documents", "text_chars")
            },
            "filter": _filter_report(cfg, st),
            "cpu_s": round(sum(t["cpu_s"] for t in st), 3),
            "rejects": rejects.report(),
        }
        write_report(plan.out, report)
        return {"documents": report["documents"]}


def _filter_report(cfg: IngestConfig, st: list[dict]) -> dict | None:
    """kept, dropped per reason, the dropped values per key, and included values never seen."""
    rules = DocFilter(cfg.include, cfg.exclude, cfg.source)
    if not rules:
        return None
    dropped: Counter = Counter()
    values: dict[str, Counter] = {}
    seen: dict[str, set] = {}
    for t in st:
        dropped.update(t["dropped"])
        for k, v in t["dropped_values"].items():
            values.setdefault(k, Counter()).update(v)
        for k, v in t["seen"].items():
            seen.setdefault(k, set()).update(v)
    unseen = {
        ".".join(p): sorted(set(allowed) - seen.get(".".join(p), set()), key=str)
        for p, allowed in rules.include.items()
    }
    unseen = {k: v for k, v in unseen.items() if v}
    if unseen:
        print(f"ingest {cfg.source}: included values no document had: {unseen}", file=sys.stderr)
    return {
        "kept": sum(t.get("documents", 0) for t in st),
        "dropped": dict(sorted(dropped.items())),
        "dropped_values": {k: dict(v.most_common()) for k, v in sorted(values.items())},
        "include_never_seen": unseen,
    }


def run(cfg: IngestConfig) -> dict:
    """Read a source (local JSONL, streamed HF) into `output` with `meta.source` set, ids
    prefixed by the source name and the include/exclude filter applied, as tasks over shares of
    its pieces; returns the stage report."""
    t0 = time.perf_counter()
    scaleout.validate(cfg)
    plan = _Plan(cfg)
    with scaleout.owned(plan, "ingest"):
        scaleout.prepare(plan, [("ingest", plan.fingerprint()), ("report", {})])
        steps = [(IngestShare(plan), plan.tasks), (IngestReport(plan), 1)]
        jobs = executors.run_steps(steps, cfg, plan.work)
        return scaleout.finish("ingest", plan, jobs, t0, "documents_in", "docs_per_s")
