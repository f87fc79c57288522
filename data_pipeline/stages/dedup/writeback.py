"""The filter step: each signature task's kept documents copied from its spool to its part
of the output (no JSON parsed: the spool holds them in output form), and the sources of the
removed documents and their kept copies read for the report."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipeline.documents import AtomicWriter, loads_line, source_name
from data_pipeline.runtime import scaleout
from data_pipeline.stages.dedup.corpus import Corpus, Parts, save_npy


class _Writeback:
    """Starts the disk writes of a file being written every 16 MiB (Linux sync_file_range,
    asynchronous), so that the fsync that makes the output durable at the end waits for the
    last few MiB instead of the whole file (docs/data-dedup.md, "Measured"). A no-op where
    sync_file_range is missing."""

    _SYNC_FILE_RANGE_WRITE = 2

    def __init__(self, path: Path):
        self.fd, self.pending = -1, 0
        try:
            import ctypes

            self.call = ctypes.CDLL(None, use_errno=True).sync_file_range
            self.call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            self.fd = os.open(path, os.O_RDONLY)
        except (AttributeError, OSError):
            pass

    def poke(self, written: int) -> None:
        self.pending += written
        if self.fd >= 0 and self.pending >= 16 << 20:
            self.call(self.fd, 0, 0, self._SYNC_FILE_RANGE_WRITE)
            self.pending = 0

    def __enter__(self) -> _Writeback:
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)


def _write_kept(
    parts: Parts, keep: np.ndarray, output: Path, progress, needed: np.ndarray
) -> tuple[int, list[str]]:
    """Copy the kept documents of one signature task from its spool (document k is its line k,
    already in output form) to `output`, atomically: a segment of the spool at a time, one
    write per run of kept documents. Only the lines of `needed` (sorted local numbers) are
    parsed, for their `meta.source` (returned in their order) while their segment is read."""
    off = parts.spool_off
    n_docs = len(off) - 1
    if len(keep) != n_docs:
        raise RuntimeError("keep.npy does not match the document count of the spool")
    done, sources, todo = 0, [], needed.tolist()
    with AtomicWriter(output) as out, _Writeback(out.tmp) as writeback:
        for lo, hi, row in parts.segments():
            data, base = parts.spool(row, lo, hi), off[lo]
            k = keep[lo:hi]
            # runs of kept documents: [edges[2i], edges[2i+1]) relative to lo
            edges = np.flatnonzero(np.diff(k.astype(np.int8), prepend=0, append=0))
            cuts = (off[lo + edges] - base).tolist()
            for a, b in zip(cuts[::2], cuts[1::2], strict=True):
                out.write_bytes(data[a:b])
            while len(sources) < len(todo) and todo[len(sources)] < hi:
                d = todo[len(sources)]
                sources.append(
                    source_name(loads_line(bytes(data[off[d] - base : off[d + 1] - base])))
                )
            writeback.poke(len(data))
            progress.update(hi - lo)
            done = hi
        if done != n_docs or len(sources) != len(todo):
            raise RuntimeError("the spool segments do not cover every document")
    return int(keep.sum()), sources


class DedupFilter(scaleout.TaskStep):
    """Task r: the kept documents of signature task r's share, from its spool, as part r."""

    name = "filter"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        corpus = Corpus(plan)
        keep = np.load(self.work / "clusters" / "keep.npy")
        if len(keep) != corpus.n_docs:
            raise RuntimeError("keep.npy does not match the document count")
        lo, hi = int(corpus.offsets[rank]), int(corpus.offsets[rank + 1])
        part = plan.part(rank)
        scaleout.remove_stale(part.parent, f".{part.name}.tmp-*")  # of a killed attempt
        # The report's per-source counts need the `meta.source` of this share's removed
        # documents and of the kept copies of any removed document: only their lines are
        # parsed, saved as filter/sources-<r>.npy rows (global document, index into the
        # names in this task's statistics), which the report joins.
        rows = np.load(self.work / "clusters" / "removed.npy")
        needed = np.unique(rows[:, :2])
        mine = needed[(needed >= lo) & (needed < hi)]
        try:
            desc = f"dedup filter task {rank}/{world_size}"
            with scaleout.progress(self.cfg, desc, hi - lo, "doc") as bar:
                kept, found = _write_kept(corpus.parts(rank), keep[lo:hi], part, bar, mine - lo)
        finally:
            corpus.close()
        names = sorted(set(found))
        code = {n: i for i, n in enumerate(names)}
        codes = np.array([code[n] for n in found], dtype=np.int64)
        save_npy(self.work / "filter" / f"sources-{rank:05d}.npy", np.stack([mine, codes], 1))
        return {"docs_in": hi - lo, "docs_out": kept, "source_names": names}
