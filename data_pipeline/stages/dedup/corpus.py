"""The signature tasks' files read back as one corpus in input order (the buckets, clusters
and filter steps read them), and the results the later steps leave in the work directory."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zstandard

from data_pipeline.documents import loads_line
from data_pipeline.files import atomic_write
from data_pipeline.kernels.lsh import band_keys
from data_pipeline.stages.dedup.plan import DedupPlan

# Columns of segments.npy, one row per signature task that had documents: where its documents'
# shingle hashes and spooled lines are. Document d of the task whose first document is
# FIRST <= d has its hashes at byte HASH_OFF + 4 * (shingle_offsets[d] - SHINGLE_BASE) of
# part-<PART>.hashes and its line at SPOOL_OFF + spool_offsets[d] - SPOOL_BASE of
# part-<PART>.spool (within the decompressed frame of SPOOL_LEN bytes at SPOOL_OFF when the
# spool is zstd).
FIRST, PART, HASH_OFF, SHINGLE_BASE, SPOOL_OFF, SPOOL_LEN, SPOOL_BASE = range(7)


class Parts:
    """Reads documents' shingle hashes and spooled lines from the workers' part files."""

    def __init__(self, work: Path, info: dict):
        self.work = work
        self.names = info["parts"]
        self.zstd = info["spool"] == "zstd"
        self.seg = np.load(work / "segments.npy")
        self.shingle_off = np.load(work / "shingle_offsets.npy")
        self.spool_off = np.load(work / "spool_offsets.npy")
        self.fds: dict[tuple, int] = {}

    def _fd(self, part: int, kind: str) -> int:
        fd = self.fds.get((part, kind))
        if fd is None:
            path = self.work / f"{self.names[part]}.{kind}"
            fd = self.fds[part, kind] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def hashes(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shingle hashes of `docs` (concatenated; doc k owns out[offs[k]:offs[k+1]])."""
        seg = self.seg[np.searchsorted(self.seg[:, FIRST], docs, side="right") - 1]
        lo, hi = self.shingle_off[docs], self.shingle_off[docs + 1]
        where = seg[:, HASH_OFF] + 4 * (lo - seg[:, SHINGLE_BASE])
        offs = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(hi - lo, out=offs[1:])
        out = np.empty(offs[-1], dtype=np.uint32)
        view = memoryview(out).cast("B")
        rows = seg[:, PART].tolist(), where.tolist(), offs[:-1].tolist(), (hi - lo).tolist()
        for part, at, o, n in zip(*rows, strict=True):
            got = os.preadv(self._fd(part, "hashes"), [view[4 * o : 4 * (o + n)]], at)
            if got != 4 * n:
                raise RuntimeError(f"{self.names[part]}.hashes: shorter than the index says")
        return out, offs

    def segments(self) -> Iterator[tuple[int, int, list]]:
        """(first doc, end doc, its segments.npy row) for each segment in document order."""
        n_docs = len(self.spool_off) - 1
        ends = [*self.seg[1:, FIRST].tolist(), n_docs][: len(self.seg)]
        for row, end in zip(self.seg.tolist(), ends, strict=True):
            yield row[FIRST], end, row

    def spool(self, row: list, lo: int, hi: int) -> memoryview:
        """The spooled lines of documents lo..hi-1, the whole segment of `row`."""
        data = os.pread(self._fd(row[PART], "spool"), row[SPOOL_LEN], row[SPOOL_OFF])
        if len(data) != row[SPOOL_LEN]:
            raise RuntimeError(f"{self.names[row[PART]]}.spool: shorter than its index")
        if self.zstd and data:
            data = zstandard.ZstdDecompressor().decompress(data)
        if len(data) != self.spool_off[hi] - self.spool_off[lo]:
            raise RuntimeError("the spool does not match its offsets (truncated?)")
        return memoryview(data)


class Corpus:
    """Every signature task's documents as one corpus in input order: global document d is
    document d - offsets[t] of task t (the tasks' shares are contiguous and in order)."""

    def __init__(self, plan: DedupPlan):
        self.dirs = [plan.sig_dir(r) for r in range(plan.tasks)]
        self.infos = [json.loads((d / "signatures.done.json").read_text()) for d in self.dirs]
        self.offsets = np.cumsum([0] + [i["docs"] for i in self.infos]).astype(np.int64)
        self.n_docs = int(self.offsets[-1])
        self.num_perm = plan.cfg.num_perm
        self._parts: dict[int, Parts] = {}

    def parts(self, t: int) -> Parts:
        if t not in self._parts:
            self._parts[t] = Parts(self.dirs[t], self.infos[t])
        return self._parts[t]

    def close(self) -> None:
        for p in self._parts.values():
            p.close()
        self._parts.clear()

    def _by_task(self, docs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(task, its documents' local numbers) for sorted global `docs`, in order."""
        task = np.searchsorted(self.offsets, docs, side="right") - 1
        for t in np.unique(task).tolist():
            yield t, docs[task == t] - self.offsets[t]

    def hashes(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As Parts.hashes, for sorted global document numbers."""
        outs, sizes = [], []
        for t, local in self._by_task(docs):
            h, o = self.parts(t).hashes(local)
            outs.append(h)
            sizes.append(np.diff(o))
        offs = np.zeros(len(docs) + 1, dtype=np.int64)
        if sizes:
            np.cumsum(np.concatenate(sizes), out=offs[1:])
        return (np.concatenate(outs) if outs else np.zeros(0, np.uint32)), offs

    def signatures(self, docs: np.ndarray) -> np.ndarray:
        """[len(docs), num_perm] signatures of sorted global `docs`."""
        sig = np.empty((len(docs), self.num_perm), dtype=np.uint32)
        row = 4 * self.num_perm
        view = memoryview(sig).cast("B")
        n = 0
        for t, local in self._by_task(docs):
            fd = os.open(self.dirs[t] / "signatures.u32", os.O_RDONLY)
            try:
                for d in local.tolist():
                    if os.preadv(fd, [view[n * row : (n + 1) * row]], d * row) != row:
                        raise RuntimeError(f"{self.dirs[t]}/signatures.u32: shorter than its count")
                    n += 1
            finally:
                os.close(fd)
        return sig

    def band_key_chunks(
        self, k: int, bands: int, rows: int, step: int = 1 << 16
    ) -> Iterator[np.ndarray]:
        """Band k's key of every document, in document order, `step` documents at a time
        (memory does not grow with the corpus). Read from the signature tasks' band files, or
        made again from their signatures when those were keyed for another banding."""
        for d, info in zip(self.dirs, self.infos, strict=True):
            if json.loads((d / "band_keys.json").read_text()) == [bands, rows]:
                path = d / f"band{k:03d}.u64"
                if path.stat().st_size != 8 * info["docs"]:
                    raise RuntimeError(
                        f"{path}: {path.stat().st_size // 8} keys for {info['docs']} docs"
                    )
                for lo in range(0, info["docs"], step):
                    yield np.fromfile(path, np.uint64, min(step, info["docs"] - lo), offset=8 * lo)
            else:  # signature rows are num_perm x 4 bytes: 16,384 at a time at most
                rows_step = min(step, 1 << 14)
                for lo in range(0, info["docs"], rows_step):
                    hi = min(lo + rows_step, info["docs"])
                    sig = _signature_rows(d, self.num_perm, lo, hi)[:, k * rows : (k + 1) * rows]
                    yield band_keys(np.ascontiguousarray(sig), rows, 1)[:, 0]

    def exact_key_chunks(self, step: int = 1 << 20) -> Iterator[np.ndarray]:
        """Every document's exact-duplicate key ([k, 2] uint64 rows, written by the signature
        step), in document order, `step` documents at a time."""
        for d, info in zip(self.dirs, self.infos, strict=True):
            path = d / "exact.u64"
            if path.stat().st_size != 16 * info["docs"]:
                raise RuntimeError(f"{path}: {path.stat().st_size // 16} keys, {info['docs']} docs")
            for lo in range(0, info["docs"], step):
                n = min(step, info["docs"] - lo)
                yield np.fromfile(path, np.uint64, 2 * n, offset=16 * lo).reshape(-1, 2)

    def exact_removed(self, work: Path, tasks: int) -> np.ndarray:
        """[m, 2] int64 (document, its canonical copy) of every exact duplicate the exact
        step's `tasks` tasks removed, by document; none when the step did not run."""
        parts = [np.load(work / "exact" / f"removed-{t:05d}.npy") for t in range(tasks)]
        out = np.concatenate([np.zeros((0, 2), np.int64), *parts])
        return out[np.argsort(out[:, 0], kind="stable")]

    def doc_id(self, d: int) -> str:
        ((t, local),) = self._by_task(np.array([d]))
        parts, local = self.parts(t), int(local[0])
        for lo, hi, row in parts.segments():
            if lo <= local < hi:
                data, off = parts.spool(row, lo, hi), parts.spool_off
                return loads_line(bytes(data[off[local] - off[lo] : off[local + 1] - off[lo]]))[
                    "id"
                ]
        raise RuntimeError(f"document {d} is in no spool segment")


def _signature_rows(task_dir: Path, num_perm: int, lo: int, hi: int) -> np.ndarray:
    """Signatures of documents lo..hi-1 of a task, read from disk. Plain reads rather than a
    memmap, so that pages already used do not stay in this process's resident set."""
    with open(task_dir / "signatures.u32", "rb") as f:
        f.seek(4 * num_perm * lo)
        raw = f.read(4 * num_perm * (hi - lo))
    return np.frombuffer(raw, dtype=np.uint32).reshape(-1, num_perm)


def save_npy(path: Path, arr: np.ndarray) -> None:
    """`arr` as a .npy file at `path`, replaced atomically (a step's result that a later step,
    or a rerun, trusts once it is there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write(path, buf.getbuffer())
