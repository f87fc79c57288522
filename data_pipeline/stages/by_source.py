"""By source: documents deduplicated across sources routed back to one directory per source.

OPT deduplicated its five corpora together, then trained on a mixture of them. With the chain's
`shards: per_source`, this step runs after the joint dedup: each document goes to
`<output>/<meta.source>/`, so every source is tokenized into its own shard set and
`data.sources` can weight them at train time, each holding a duplicate that crossed sources
once (where dedup kept it).

Tasks (data_pipeline.runtime.scaleout) each read a contiguous share of the input files and write
one part per source (empty where the share has none of its documents); the report step
publishes the parts, in rank order, under `<output>/<source>/` all at once. The output is the
same documents in the same order for any split.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from data_pipeline import ownership
from data_pipeline.documents import AtomicWriter, InputLimits, Rejects, read_documents
from data_pipeline.files import publish_dir, publish_file, temporary_beside
from data_pipeline.runtime import executors, scaleout
from data_pipeline.runtime.cli import rejects_path, report_path, write_report
from data_pipeline.runtime.plan import PART_SUFFIX, StagePlan
from data_pipeline.shards import MANIFEST, read_manifest


@dataclass
class BySourceConfig(scaleout.ScaleOut):
    input: Any = MISSING
    output: str = MISSING
    sources: list[str] = field(default_factory=list)  # every source's name, in chain order
    work_dir: str | None = None
    keep_work: bool = False


class _Plan(StagePlan):
    stage = "by_source"

    def __init__(self, cfg: BySourceConfig):
        if not cfg.sources:
            raise ValueError("by_source: sources is empty")
        super().__init__(cfg)
        if self.to_file:
            raise ValueError(f"output={self.out}: by_source writes a directory per source")
        self.share_files()

    def fingerprint(self) -> dict:
        limits = {k: getattr(self.cfg, k) for k in ("max_line_bytes", "max_rejects")}
        return {"files": self.files_fingerprint(), "tasks": self.tasks,
                "sources": list(self.cfg.sources), **limits}  # fmt: skip

    def source_part(self, name: str, rank: int) -> Path:
        return self.parts / name / f"part-{rank:05d}{PART_SUFFIX}"


class RouteShare(scaleout.TaskStep):
    """Task r writes the documents of its share of the input files into one part per source."""

    name = "route"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        lo, hi = plan.shares[rank]
        known = set(plan.cfg.sources)
        for name in plan.cfg.sources:  # a killed attempt's parts and temporaries
            part = plan.source_part(name, rank)
            scaleout.remove_stale(part.parent, f".{part.name}.tmp-*")
            part.unlink(missing_ok=True)
        final = scaleout.task_file(self.work, self.name, rank, ".rejects.jsonl")
        tmp = temporary_beside(final)
        rejects = Rejects(tmp, InputLimits.of(self.cfg))
        counts: Counter = Counter()
        # A part for every source, empty or not: each source's set has one part per task.
        writers = {name: AtomicWriter(plan.source_part(name, rank)) for name in plan.cfg.sources}
        try:
            for doc in read_documents(plan.files[lo:hi], rejects):
                name = doc["meta"].get("source")
                if name not in known:
                    raise ValueError(
                        f"document {doc['id']!r}: meta.source={name!r} is none of the chain's "
                        f"sources {sorted(known)}"
                    )
                writers[name].write_doc(doc)
                counts[name] += 1
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            rejects.close()
        for w in writers.values():
            w.close()
        if tmp.exists():
            publish_file(tmp, final)
        return {"documents": dict(counts), "rejects": rejects.report()}


class RouteReport(scaleout.TaskStep):
    """One task: the report and every source's parts published as `<output>/<source>/`."""

    name = "report"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        st = scaleout.task_stats(self.work, "route", plan.tasks)
        rejects = scaleout.gather_rejects(
            [scaleout.task_file(self.work, "route", r, ".rejects.jsonl")
             for r in range(plan.tasks)],
            [t["rejects"] for t in st],
            rejects_path(plan.out),
        )  # fmt: skip
        ownership.check_output(plan.out)
        if not report_path(plan.out).exists():  # the output's mark from when it is published
            write_report(plan.out, {"stage": "publishing", "output": str(plan.out)})
        tmp = temporary_beside(plan.out)
        ownership.rmtree(tmp)
        for name in plan.cfg.sources:
            (tmp / name).mkdir(parents=True)
            for r in range(plan.tasks):
                part = plan.source_part(name, r)
                _link(part, tmp / name / part.name)
        ownership.check_output(plan.out)  # checked again: it may have appeared meanwhile
        publish_dir(tmp, plan.out)
        by_source = {n: sum(t["documents"].get(n, 0) for t in st) for n in plan.cfg.sources}
        report = {
            "stage": "by_source",
            "output": str(plan.out),
            "tasks": plan.tasks,
            "documents": sum(by_source.values()),
            "documents_by_source": by_source,
            "cpu_s": round(sum(t["cpu_s"] for t in st), 3),
            "rejects": rejects.report(),
        }
        write_report(plan.out, report)
        return {"documents": report["documents"]}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or no hard links
        shutil.copy2(src, dst)


def refuse_joint_output(output: Path) -> None:
    """Per-source sets go under `output`: refuse one that already is a joint shard set."""
    if (output / MANIFEST).is_file():
        raise ownership.NotOursError(
            f"output={output} is one shard set of every source; shards=per_source writes one "
            "per source under output: choose another output"
        )


def shard_sets_summary(sets: list[dict]) -> dict:
    """`shard_sets` (each per-source set's path, documents and training tokens) and the
    `data.sources` that trains on them in proportion to their training tokens, as a list, as
    YAML for a config file and as a command-line override."""
    rows, sources = [], []
    for s in sets:
        m = read_manifest(Path(s["path"]))
        train = m["splits"].get("train", {})
        tokens, docs = int(train.get("num_tokens", 0)), int(train.get("num_documents", 0))
        rows.append({"name": s["name"], "path": str(Path(s["path"]).resolve()),
                     "train_documents": docs, "train_tokens": tokens})  # fmt: skip
        if tokens:  # a weight must be positive: a set with no training tokens is left out
            sources.append({"name": s["name"], "path": rows[-1]["path"], "weight": tokens})
    flow = [", ".join(f"{k}: {json.dumps(v)}" for k, v in d.items()) for d in sources]
    yaml = "data:\n  path: null\n  sources:  # weights: training tokens (proportional to size)\n"
    yaml += "".join(f"    - {{{f}}}\n" for f in flow)
    cli = ",".join("{" + ",".join(f"{k}:{v}" for k, v in d.items()) + "}" for d in sources)
    return {
        "shard_sets": rows,
        "data_sources": sources,
        "data_sources_yaml": yaml,
        "data_sources_override": f"'data.sources=[{cli}]'",
    }


def run(cfg: BySourceConfig) -> dict:
    """Route every document of `input` to `output/<meta.source>/`; returns the stage report."""
    t0 = time.perf_counter()
    scaleout.validate(cfg)
    plan = _Plan(cfg)
    with scaleout.owned(plan, "by_source"):
        scaleout.prepare(plan, [("route", plan.fingerprint()), ("report", {})])
        steps = [(RouteShare(plan), plan.tasks), (RouteReport(plan), 1)]
        jobs = executors.run_steps(steps, cfg, plan.work)
        return scaleout.finish("by_source", plan, jobs, t0, "documents", "docs_per_s")
