"""The scan step: each task streams its share of the corpus against the evaluation index,
applies the action and counts what it found, per task and per source."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from data_pipeline.documents import AtomicWriter, InputLimits, Rejects, read_documents
from data_pipeline.files import publish_file, temporary_beside
from data_pipeline.runtime import scaleout
from data_pipeline.stages.decontaminate import eval_index
from data_pipeline.stages.decontaminate.ngrams import NgramIndex, masked, text_ngrams

NO_SOURCE = "(no source)"  # documents without meta.source, in the per-source counts


class Decontaminator:
    """One document at a time: which tasks contaminate it (at least `min_ngrams` distinct
    n-grams of the task), what the action makes of it, and the counts."""

    def __init__(self, cfg: Any, index: NgramIndex, names: list[str]):
        self.cfg, self.index, self.names = cfg, index, names
        self.totals: Counter = Counter()
        self.by_task: dict[str, Counter] = {}
        self.by_source: dict[str, Counter] = {}
        self.examples: dict[str, list[dict]] = {}

    def __call__(self, doc: dict) -> tuple[dict | None, dict | None]:
        """(the document to write or None, its match record or None)."""
        cfg, t, n = self.cfg, self.totals, self.cfg.ngram
        source = doc["meta"].get("source")
        source = source if isinstance(source, str) else NO_SOURCE
        src = self.by_source.setdefault(source, Counter())
        t["docs_in"] += 1
        src["docs_in"] += 1
        ws, hashes = text_ngrams(doc["text"], cfg.ngram)
        m = self.index.match(hashes)
        found = {k: v for k, v in m.distinct.items() if v >= cfg.min_ngrams} if m else {}
        if not found:
            t["docs_out"] += 1
            return doc, None
        record = {"id": doc["id"], "source": source, "tasks": {}}
        hits = 0
        for k in sorted(found):
            name = self.names[k]
            record["tasks"][name] = {"ngrams": found[k], "hits": m.hits[k]}
            hits += m.hits[k]
            self.by_task.setdefault(name, Counter()).update(documents=1, ngram_hits=m.hits[k])
            ex = self.examples.setdefault(name, [])
            if len(ex) < cfg.examples:
                s = int(m.starts[k][0])
                ex.append({"id": doc["id"], "source": source, "ngram": " ".join(ws[s : s + n])})
        t["docs_contaminated"] += 1
        t["ngram_hits"] += hits
        src.update(documents=1, ngram_hits=hits)
        return self._act(doc, m, found), record

    def _act(self, doc: dict, m: Any, found: dict) -> dict | None:
        cfg, t = self.cfg, self.totals
        if cfg.action == "report":
            t["docs_out"] += 1
            return doc
        if cfg.action == "remove":
            t["docs_removed"] += 1
            return None
        starts = np.unique(np.concatenate([m.starts[k] for k in found]))
        if cfg.mask_max_hits and len(starts) > cfg.mask_max_hits:  # contaminated throughout
            t["docs_too_dirty"] += 1
            return None
        text, spans, chars, words_left = masked(
            doc["text"], starts, cfg.ngram, cfg.mask_with, cfg.mask_window, cfg.mask_min_piece
        )
        t.update(spans_masked=spans, chars_masked=chars)
        if not words_left:  # nothing but evaluation text: no document left to train on
            t["docs_emptied"] += 1
            return None
        t.update(docs_masked=1, docs_out=1)
        return {**doc, "text": text}

    def stats(self) -> dict:
        return {
            **self.totals,
            "by_task": {k: dict(v) for k, v in self.by_task.items()},
            "by_source": {k: dict(v) for k, v in self.by_source.items()},
            "examples": self.examples,
        }


class DecontaminateScan(scaleout.TaskStep):
    """Task r reads its contiguous share of the input files, writes what the action keeps to
    part r and every contaminated document's record to its matches file."""

    name = "scan"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        index, names = eval_index.load(plan.index_dir)
        dec = Decontaminator(self.cfg, index, names)
        lo, hi = plan.shares[rank]
        files = plan.files[lo:hi]
        part = plan.part(rank)
        scaleout.remove_stale(part.parent, f".{part.name}.tmp-*")  # of a killed attempt
        final = scaleout.task_file(self.work, self.name, rank, ".rejects.jsonl")
        tmp = temporary_beside(final)
        rejects = Rejects(tmp, InputLimits.of(self.cfg))
        total = sum(f.stat().st_size for f in files)
        bar = scaleout.progress(self.cfg, f"decontaminate task {rank}/{world_size}", total)
        matches = scaleout.task_file(self.work, self.name, rank, ".matches.jsonl")
        try:
            with AtomicWriter(part) as out, AtomicWriter(matches) as found, bar:
                for doc in read_documents(files, rejects, bar):
                    kept, record = dec(doc)
                    if kept is not None:
                        out.write_doc(kept)
                    if record is not None:
                        found.write_doc(record)
        finally:
            rejects.close()
        if tmp.exists():
            publish_file(tmp, final)
        return {**dec.stats(), "rejects": rejects.report()}
