"""The report step: every task's statistics summed into the stage report, the rejects gathered
in input order, and the parts published as the output."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from data_pipeline.runtime import scaleout
from data_pipeline.runtime.cli import rejects_path, to_container, write_report
from data_pipeline.stages.dedup.clusters import EXACT, NEAR
from data_pipeline.stages.dedup.config import candidate_probability
from data_pipeline.stages.dedup.plan import STEPS


def by_source(work: Path, filter_stats: list[dict]) -> dict:
    """Removed documents per `meta.source` and those whose kept copy is from another source,
    for all removals and for the exact and near ones apart, from clusters/removed.npy and the
    filter tasks' sources-<r>.npy."""
    rows = np.load(work / "clusters" / "removed.npy")
    docs, names = [np.zeros(0, np.int64)], [np.zeros(0, dtype=object)]
    for r, st in enumerate(filter_stats):
        table = np.load(work / "filter" / f"sources-{r:05d}.npy")
        docs.append(table[:, 0])
        names.append(np.array(st["source_names"], dtype=object)[table[:, 1]])
    docs, names = np.concatenate(docs), np.concatenate(names)
    order = np.argsort(docs, kind="stable")
    docs, names = docs[order], names[order]

    def source(d: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(docs, d), max(len(docs) - 1, 0))
        if len(d) and not np.array_equal(docs[at], d):
            raise RuntimeError("filter/sources-*.npy lack documents of clusters/removed.npy")
        return names[at]

    removed, kept = source(rows[:, 0]), source(rows[:, 1])
    out = {}
    for label, sel in (
        ("all", np.ones(len(rows), dtype=bool)),
        ("exact", rows[:, 2] == EXACT),
        ("near", rows[:, 2] == NEAR),
    ):
        out[label] = {
            "removed_by_source": dict(sorted(Counter(removed[sel].tolist()).items())),
            "cross_source_duplicates": int((removed[sel] != kept[sel]).sum()),
        }
    return out


class DedupReport(scaleout.TaskStep):
    """One task: the stage report (every task's statistics), the rejects of every signature
    task in input order, and for a file output the parts joined into it."""

    name = "report"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        counts = plan.step_counts()
        st = {s: scaleout.task_stats(self.work, s, counts[s]) for s in STEPS[:-1]}
        rejects = scaleout.gather_rejects(
            [plan.sig_dir(r) / "rejects.jsonl" for r in range(plan.tasks)],
            [s["rejects"] for s in st["signatures"]],
            rejects_path(plan.out),
        )
        scaleout.finish_parts([plan.part(r) for r in range(plan.tasks)], plan.out, plan.to_file)
        cl = st["clusters"][0]
        sources = by_source(self.work, st["filter"])
        docs_in = sum(s["docs"] for s in st["signatures"])
        docs_out = sum(s["docs_out"] for s in st["filter"])
        report = {
            "stage": "dedup",
            "output": str(plan.out),
            "tasks": {s: counts[s] for s in STEPS[:-1]},
            "docs_in": docs_in,
            "docs_out": docs_out,
            "docs_removed": docs_in - docs_out,
            "exact_duplicates": cl["exact_duplicates"],
            "near_duplicates": cl["near_duplicates"],
            **sources.pop("all"),
            "by_kind": sources,
            "shingles": sum(s["shingles"] for s in st["signatures"]),
            **{k: cl[k] for k in ("candidate_pairs", "prefiltered_pairs", "verified_pairs")},
            **{k: cl[k] for k in ("clusters", "largest_cluster", "examples", "closest_rejected")},
            "banding": {
                "bands": plan.bands,
                "rows": plan.rows,
                "p_candidate": {
                    str(j): round(candidate_probability(j, plan.bands, plan.rows), 6)
                    for j in (0.5, 0.8, 0.85, 0.9, 0.95, 0.97)
                },
            },
            # Summed over each step's tasks: CPU seconds do not depend on what else the
            # machine runs; per-core rates for sizing come from them (docs/data-pipeline.md).
            "timings_s": {s: round(sum(t["seconds"] for t in st[s]), 3) for s in st if st[s]},
            "cpu_s": {s: round(sum(t["cpu_s"] for t in st[s]), 3) for s in st if st[s]},
            "max_rss_mb": {s: max(t["max_rss_mb"] for t in st[s]) for s in st if st[s]},
            "config": to_container(self.cfg),
            "rejects": rejects.report(),
        }
        write_report(plan.out, report)
        return {"docs_out": docs_out}
