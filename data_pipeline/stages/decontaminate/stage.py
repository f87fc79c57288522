"""The stage as a whole: the evaluation index built by the driver, the scan and report steps
on the configured executor, and its CLI."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from data_pipeline import ownership
from data_pipeline.config_limits import check_limits
from data_pipeline.documents import AtomicWriter, InputLimits, iter_lines
from data_pipeline.runtime import executors, scaleout
from data_pipeline.runtime.cli import rejects_path, stage_main, to_container, write_report
from data_pipeline.runtime.plan import StagePlan
from data_pipeline.stages.decontaminate import eval_index
from data_pipeline.stages.decontaminate.config import DECONTAMINATE_LIMITS, DecontaminateConfig
from data_pipeline.stages.decontaminate.ngrams import INDEX_BYTES_PER_NGRAM
from data_pipeline.stages.decontaminate.scan import DecontaminateScan

TOTALS = ("docs_in", "docs_out", "docs_contaminated", "ngram_hits", "docs_removed", "docs_masked",
          "spans_masked", "chars_masked", "docs_emptied", "docs_too_dirty")  # fmt: skip


def matches_path(output: str | Path) -> Path:
    """Every contaminated document (id, source, per task its n-grams and hits), beside the
    output as `<output>.matches.jsonl`, in input order."""
    out = Path(output)
    return out.with_name(out.name + ".matches.jsonl")


class DecontaminatePlan(StagePlan):
    """The run's input files and shares (StagePlan) and where the evaluation index lives."""

    stage = "decontaminate"

    def __init__(self, cfg: DecontaminateConfig):
        check_limits(cfg, "", DECONTAMINATE_LIMITS)  # a config built in Python may have changed
        super().__init__(cfg)
        self.share_files()
        self.index_dir = self.work / "index"

    def fingerprints(self, index_digest: str) -> list[tuple[str, dict]]:
        cfg = self.cfg
        params = ("ngram", "min_ngrams", "action", "mask_with", "mask_window", "mask_min_piece",
                  "mask_max_hits", "examples")  # fmt: skip
        scan = {
            "inputs": self.files_fingerprint(),
            "tasks": self.tasks,
            "index": index_digest,
            "limits": InputLimits.of(cfg).fingerprint(),
            **{k: getattr(cfg, k) for k in params},
        }
        return [("scan", scan), ("report", {"output": str(self.out.resolve())})]


def _summed(stats: list[dict], key: str) -> dict[str, dict]:
    """Per-task or per-source counters of every task summed, names sorted."""
    total: dict[str, Counter] = {}
    for st in stats:
        for name, counts in st[key].items():
            total.setdefault(name, Counter()).update(counts)
    return {name: dict(sorted(total[name].items())) for name in sorted(total)}


class DecontaminateReport(scaleout.TaskStep):
    """One task: the stage report (every scan task's counts summed, examples in input order),
    the matches and rejects files in input order, and the parts published as the output."""

    name = "report"

    def task(self, rank: int, world_size: int) -> dict:
        plan, cfg = self.plan, self.cfg
        st = scaleout.task_stats(self.work, "scan", plan.tasks)
        rejects = scaleout.gather_rejects(
            [scaleout.task_file(self.work, "scan", r, ".rejects.jsonl") for r in range(plan.tasks)],
            [t["rejects"] for t in st],
            rejects_path(plan.out),
        )
        matches = matches_path(plan.out)
        matches.unlink(missing_ok=True)
        if any(t.get("docs_contaminated") for t in st):
            with AtomicWriter(matches) as w:
                for r in range(plan.tasks):
                    for line in iter_lines(
                        scaleout.task_file(self.work, "scan", r, ".matches.jsonl")
                    ):
                        w.write_bytes(line)
        scaleout.finish_parts([plan.part(r) for r in range(plan.tasks)], plan.out, plan.to_file)
        meta = json.loads((plan.index_dir / "index.json").read_text())
        by_task = _summed(st, "by_task")
        examples: dict[str, list] = {}
        for t in st:
            for name, ex in t["examples"].items():
                examples.setdefault(name, []).extend(ex)
        report = {
            "stage": "decontaminate",
            "output": str(plan.out),
            "tasks": plan.tasks,
            "action": cfg.action,
            **{k: sum(t.get(k, 0) for t in st) for k in TOTALS},
            "eval": {
                name: {**s, **by_task.get(name, {"documents": 0, "ngram_hits": 0})}
                for name, s in sorted(meta["stats"].items())
            },
            # The index every scan task maps: distinct n-grams over all tasks, and its bytes.
            "index": {"ngrams": meta["ngrams"], "bytes": meta["ngrams"] * INDEX_BYTES_PER_NGRAM},
            "by_source": _summed(st, "by_source"),
            "examples": {k: examples[k][: cfg.examples] for k in sorted(examples)},
            "matches": str(matches) if matches.exists() else None,
            "cpu_s": round(sum(t["cpu_s"] for t in st), 3),
            "max_rss_mb": max(t["max_rss_mb"] for t in st),
            "config": to_container(cfg),
            "rejects": rejects.report(),
        }
        write_report(plan.out, report)
        return {"docs_out": report["docs_out"]}


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in eval_index.INDEX_FILES:
        h.update((directory / name).read_bytes())
    return h.hexdigest()


def run(cfg: DecontaminateConfig) -> dict:
    """Find (and, as `action` says, remove or mask) the corpus documents that share n-grams
    with the evaluation texts; returns the stage report (slurm.wait=false: the job ids)."""
    t0 = time.perf_counter()
    scaleout.validate(cfg)
    plan = DecontaminatePlan(cfg)
    ownership.check_output(plan.out)  # a typo in output= must not cost the index's build
    # Before any work: bad evaluation input stops the run here, naming the file or the task.
    index, names, stats = eval_index.build(cfg)
    with scaleout.owned(plan, "decontaminate"):
        staged = plan.work / "index.new"
        eval_index.save(staged, index, names, stats)
        scaleout.prepare(plan, plan.fingerprints(_digest(staged)))
        for name in eval_index.INDEX_FILES:  # each an atomic rename; the scan tasks read these
            plan.index_dir.mkdir(parents=True, exist_ok=True)
            (staged / name).replace(plan.index_dir / name)
        staged.rmdir()
        steps = [(DecontaminateScan(plan), plan.tasks), (DecontaminateReport(plan), 1)]
        jobs = executors.run_steps(steps, cfg, plan.work)
        return scaleout.finish("decontaminate", plan, jobs, t0, "docs_in", "docs_per_s")


def main() -> None:
    """`python -m data_pipeline.decontaminate key=value ...`; the steps live in modules of
    this package, so the executors pickle them by reference."""
    stage_main("decontaminate", DecontaminateConfig, run)
