"""Ingest: one source read once into the chain's work directory, tagged with its name.

Every document gets `meta.source = <name>` and its id prefixed by `<name>/`, so ids stay unique
across sources and tokenize's `weights` find each source's documents. Later stages read the
corpus more than once (dedup makes two passes), so a streamed Hugging Face source is fetched
only here. Runs as a step of the chain (data_pipeline/chain.py), one file per source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from data_pipeline.documents import AtomicWriter, InputLimits, Rejects
from data_pipeline.ownership import check_output
from data_pipeline.runtime.cli import rejects_path, write_report
from data_pipeline.runtime.progress import Progress
from data_pipeline.sources import iter_source_documents, local_files, normalize


@dataclass
class IngestConfig:
    input: Any = MISSING
    output: str = MISSING
    source: str = MISSING
    progress: bool = True
    progress_interval_s: float = 30.0
    max_line_bytes: int = 64 << 20
    max_rejects: int = 10_000
    reject_text_bytes: int = 4096


def run(cfg: IngestConfig) -> dict:
    """Read a source (JSONL or streamed HF) into one JSONL file with `meta.source` set and ids
    prefixed by the source name."""
    out = Path(cfg.output)
    check_output(out)
    rejects_path(out).unlink(missing_ok=True)  # an earlier run's rejects would mislead
    rejects = Rejects(rejects_path(out), InputLimits.of(cfg))
    n, nbytes = 0, 0
    # Bytes of the local files; a streamed HF source (no size up front) counts documents.
    total = sum(p.stat().st_size for p in local_files(cfg.input))
    by_docs = any("hf" in e for e in normalize(cfg.input))
    bar = Progress(f"ingest {cfg.source}", None if by_docs else total,
                   "doc" if by_docs else "B", enabled=cfg.progress,
                   interval_s=cfg.progress_interval_s)  # fmt: skip
    try:
        with AtomicWriter(out) as w, bar:
            for doc in iter_source_documents(cfg.input, rejects, None if by_docs else bar):
                if by_docs:
                    bar.update(1)
                doc["id"] = f"{cfg.source}/{doc['id']}"
                doc["meta"] = {**doc["meta"], "source": cfg.source}
                w.write_doc(doc)
                n += 1
                nbytes += len(doc["text"])
    finally:
        rejects.close()
    report = {
        "stage": "ingest",
        "source": cfg.source,
        "output": str(out),
        "documents": n,
        "text_chars": nbytes,
        "rejects": rejects.report(),
    }
    write_report(out, report)
    return report
