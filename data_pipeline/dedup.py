"""Near-duplicate removal across all sources: MinHash-LSH candidates, exact verification,
union-find clusters, one document kept per cluster.

    python -m data_pipeline.dedup input=<file|dir|glob|[list]> output=out.jsonl[.gz|.zst]

OPT deduplicated its corpus with MinHash-LSH at Jaccard >= 0.95. The trap, measured: the
bands x rows that datasketch picks as "optimal" for 0.95 with 128 permutations (3 x 42) make a
pair at J = 0.95 a candidate with probability 1 - (1 - 0.95^42)^3 = 0.31, so most true
duplicates are never even compared (recall ~0.64 on a real corpus). Here banding is chosen for
recall instead (default 18 bands x 7 rows: P(candidate | J = 0.90) > 0.9999), which lets many
dissimilar pairs through, and every candidate pair is then verified on the documents' exact
shingle sets before it may join a cluster. See docs/data-dedup.md for the arithmetic.

Stages, each restartable from files in a work directory beside the output
(`<output>.dedup-work/`, removed after success unless `keep_work=true`):

1. signatures: stream the input lines to worker processes, which parse them as
   io.read_documents does and compute MinHash signatures (data_pipeline.minhash,
   bit-identical to datasketch); append the signatures and every document's shingle hashes
   to flat files, and the documents in output form to a spool file (plain or zstd).
2. buckets: for each band, a 64-bit key per document, written per band to disk; each band's
   keys are sorted on their own, and documents with equal keys become candidate pairs.
3. clusters: verify each candidate pair, union-find over verified pairs, keep the first
   document of each cluster in input order.
4. write: copy the kept documents' lines from the spool to the output atomically
   (AtomicWriter); the input is read and parsed once.

Memory follows the number of documents (a few tens of bytes each while sorting one band) and
the batch size, never the corpus text.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from omegaconf import MISSING

from data_pipeline.cli import rejects_path, stage_main, to_container, write_report
from data_pipeline.io import (
    TRUNCATED_ERRORS,
    AtomicWriter,
    LineRejected,
    Rejects,
    _zstd_chunks,
    document,
    dumps_doc,
    expand_inputs,
    iter_lines,
    json_object,
    loads_line,
    truncated_reason,
)
from data_pipeline.minhash import MinHasher


@dataclass
class DedupConfig:
    """Keys of `python -m data_pipeline.dedup` (docs/data-dedup.md explains each)."""

    input: Any = MISSING
    output: str = MISSING
    threshold: float = 0.95  # a pair is a near-duplicate when its Jaccard is >= this
    ngram: int = 5  # shingles are word n-grams
    num_perm: int = 128
    seed: int = 1
    scheme: str = "affine32"  # datasketch's permutation scheme: affine32 | legacy
    bands: int = 0  # 0: choose bands x rows from candidate_jaccard/candidate_recall
    rows: int = 0
    candidate_jaccard: float = 0.0  # 0: threshold - 0.05
    candidate_recall: float = 0.9999  # wanted P(candidate) at candidate_jaccard
    verify: str = "exact"  # exact: shingle-set Jaccard; signature: MinHash estimate
    prefilter_margin: float = 0.1  # skip exact check when estimate < threshold - margin
    bucket_window: int = 16  # pair each bucket member with the next `window` members
    workers: int = 0  # signature processes; 0: min(2, cpus)
    batch_bytes: int = 1 << 20  # input bytes per signature task
    backend: str = "auto"  # signature backend: auto | openssl | numba | numpy
    spool: str = "plain"  # the parsed documents kept for the write pass: plain | zstd
    work_dir: str = ""  # default: <output>.dedup-work
    keep_work: bool = False
    progress: bool = True
    examples: int = 5  # example pairs in the report


# --- banding -------------------------------------------------------------------------------


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(a pair with this Jaccard shares at least one band) = 1 - (1 - J^rows)^bands."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def choose_banding(
    num_perm: int, candidate_jaccard: float, candidate_recall: float
) -> tuple[int, int]:
    """The most selective bands x rows (largest rows, bands = num_perm // rows) that still
    makes a pair at `candidate_jaccard` a candidate with probability >= candidate_recall.
    More rows means fewer false candidates to verify; the recall floor is what matters."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if candidate_probability(candidate_jaccard, bands, rows) >= candidate_recall:
            best = (bands, rows)
    return best


def _band_keys(sig: np.ndarray, rows: int, bands: int) -> np.ndarray:
    """[docs, bands] uint64: one key per band; equal band values give equal keys. Keys of
    unequal values may collide (probability ~2^-64 per pair); that only adds a candidate,
    which verification rejects."""
    keys = np.empty((len(sig), bands), dtype=np.uint64)
    mul = np.uint64(0x9E3779B97F4A7C15)
    for k in range(bands):
        h = np.full(len(sig), 0x243F6A8885A308D3, dtype=np.uint64)
        for j in range(k * rows, (k + 1) * rows):
            h ^= sig[:, j].astype(np.uint64)
            h *= mul
            h ^= h >> np.uint64(29)
        keys[:, k] = h
    return keys


def _bucket_pairs(keys: np.ndarray, window: int) -> np.ndarray:
    """Candidate pairs (i < j, as [m, 2] int64) of documents with equal keys. Members of a
    bucket, in input order, are paired with their next `window` members: every pair in
    buckets of up to window + 1 documents, and a connected chain in larger ones (which are
    copies of one text: exact duplicates verify, so the chain links them all)."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    same = np.flatnonzero(sk[1:] == sk[:-1])
    if len(same) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    member = np.zeros(len(keys), dtype=bool)
    member[same] = True
    member[same + 1] = True
    pos = np.flatnonzero(member)
    o, k = order[pos], sk[pos]
    out = []
    for d in range(1, window + 1):
        eq = k[d:] == k[:-d]
        if not eq.any():
            break
        out.append(np.stack([o[:-d][eq], o[d:][eq]], axis=1))
    return np.concatenate(out).astype(np.int64)


# --- documents -----------------------------------------------------------------------------


def _chunks(path: Path, size: int) -> Iterator[bytes]:
    """The decompressed bytes of an input file in pieces of about `size`, with the data that
    io.iter_lines would have delivered before a truncation error, then that error."""
    with open(path, "rb") as raw:
        if path.suffix == ".zst":
            yield from _zstd_chunks(raw)
        elif path.suffix != ".gz":
            while chunk := raw.read(size):
                yield chunk
        else:  # gzip: line by line, as iter_lines, so a truncated file loses the same lines
            acc, n = [], 0
            try:
                for line in iter_lines(path):
                    acc.append(line)
                    n += len(line)
                    if n >= size:
                        yield b"".join(acc)
                        acc, n = [], 0
            except TRUNCATED_ERRORS:
                if acc:
                    yield b"".join(acc)
                raise
            if acc:
                yield b"".join(acc)


def _line_tasks(files: list[Path], size: int, zstd: bool) -> Iterator[tuple]:
    """Signature tasks: (file, number of its first line, a block of whole lines, reject,
    zstd) with about `size` bytes of one file. Workers split and parse the lines, so neither
    the JSON work nor a Python step per line stays in this process. A truncated compressed
    file ends with a task carrying its reject (at the line after the last complete one, as
    io.iter_json_lines reports it), so rejects reach the rejects file in input order (this
    generator runs in the pool's feeder thread)."""
    for path in files:
        if path.suffix not in (".gz", ".zst"):
            yield from _plain_tasks(path, size, zstd)
            continue
        lineno, tail = 0, b""  # lines sent so far; the unfinished last line
        try:
            for chunk in _chunks(path, size):
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:
                    tail += chunk
                    continue
                block = tail + chunk[:cut] if tail else chunk[:cut]
                tail = chunk[cut:]
                yield str(path), lineno + 1, block, None, zstd
                lineno += block.count(b"\n")
        except TRUNCATED_ERRORS as e:
            yield str(path), lineno + 1, b"", (lineno + 1, truncated_reason(e)), zstd
            continue
        if tail:  # a last line without a newline
            yield str(path), lineno + 1, tail, None, zstd


def _plain_tasks(path: Path, size: int, zstd: bool) -> Iterator[tuple]:
    """Tasks for an uncompressed file: (file, first line, (offset, length) of a block of
    whole lines, None, zstd). The worker reads the block itself; pickling 1 MiB blocks
    through the pool's pipe cost ~2-4 us per document (measured). The lines are still read
    here, to count them."""
    buf = bytearray(size)
    pos, lineno = 0, 0
    with open(path, "rb") as f:
        while True:
            f.seek(pos)
            n = f.readinto(buf)
            if not n:
                return
            cut = buf.rfind(b"\n", 0, n) + 1
            if cut == 0:
                if n == len(buf):  # a line longer than the buffer
                    buf = bytearray(2 * len(buf))
                    continue
                cut = n  # the last line, without a newline
            yield str(path), lineno + 1, (pos, cut), None, zstd
            lineno += buf.count(b"\n", 0, cut)
            pos += cut


_HASHER: MinHasher | None = None


def _init_worker(params: dict) -> None:
    global _HASHER
    _HASHER = MinHasher(**params)


def _signature_task(task: tuple):
    """Parse a task's lines exactly as io.read_documents does, and return the signatures and
    shingle hashes of its documents, the documents as output lines (one zstd frame: the
    spool the write stage copies kept documents from, so the input is parsed only once), and
    its rejects as (line, reason, raw) in line order. JSON allows lone surrogates, which UTF-8
    cannot encode: such a text is a reject (it could be neither hashed nor written)."""
    path, first, block, truncated, zstd, work_dir = task
    if isinstance(block, tuple):  # (offset, length) in an uncompressed file
        with open(path, "rb") as f:
            f.seek(block[0])
            block = f.read(block[1])
    name = Path(path).name
    texts, out, rejects = [], [], []
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    last = first + len(lines) - 1  # the last line has a newline only if the block ends in one
    for lineno, raw in enumerate(lines, start=first):
        try:
            obj = json_object(raw, ("text",))
            if obj is None:
                continue
            doc = document(obj, f"{name}:{lineno}")
        except LineRejected as e:
            bad = e.raw
            if bad is raw and (lineno < last or block.endswith(b"\n")):
                bad = raw + b"\n"  # the raw line as io.iter_lines gives it, newline and all
            rejects.append((lineno, e.reason, bad))
            continue
        try:
            texts.append(doc["text"].encode("utf-8"))
        except UnicodeEncodeError as e:
            reason = f"text not encodable as UTF-8 ({e.reason}) id={doc['id']}"
            rejects.append((lineno, reason, b""))
            continue
        out.append(dumps_doc(doc))
    if truncated:
        rejects.append((*truncated, b""))
    b = _HASHER.batch(texts)
    spool = b"".join(out)
    if zstd and spool:
        spool = _SPOOL_CCTX.compress(spool)
    sizes = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
    # The shingle hashes and the spool (~5 KB per 3 KB document) go to this process's own
    # part files, and the parent copies them in order with copy_file_range: receiving them
    # through the pool's pipe cost the parent ~12 us of CPU per document (measured).
    hashes = _append_part(work_dir, "hashes", b.hashes.tobytes())
    spool = _append_part(work_dir, "spool", spool)
    return path, b.signatures, np.diff(b.offsets), sizes, hashes, spool, rejects


_PARTS: dict[tuple, int] = {}  # (pid, work dir, kind) -> fd of a part file this process appends


def _append_part(work_dir: str, kind: str, data: bytes) -> tuple[str, int, int]:
    """Append `data` to this process's part file of `kind`: (its name, offset, length)."""
    name = f"part-{os.getpid()}.{kind}"
    key = (os.getpid(), work_dir, kind)
    fd = _PARTS.get(key)
    if fd is None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = _PARTS[key] = os.open(os.path.join(work_dir, name), flags, 0o644)
    offset = os.lseek(fd, 0, os.SEEK_CUR)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return name, offset, len(data)


def _close_parts() -> None:
    for key in [k for k in _PARTS if k[0] == os.getpid()]:
        os.close(_PARTS.pop(key))


def _copy_part(work: _Work, src: dict, part: tuple[str, int, int], dst_fd: int) -> None:
    """Append a range of a part file to `dst_fd`, in the kernel where it can."""
    name, offset, length = part
    if name not in src:
        src[name] = os.open(work.file(name), os.O_RDONLY)
    fd = src[name]
    while length:
        try:
            n = os.copy_file_range(fd, dst_fd, length, offset)
        except (AttributeError, OSError):  # no copy_file_range here: copy through memory
            data = os.pread(fd, length, offset)
            n = os.write(dst_fd, data)
        if n <= 0:
            raise RuntimeError(f"{name}: shorter than a worker said it wrote")
        offset += n
        length -= n


# spool=zstd: level 1 keeps a 3 KB document in ~1/3 of its size for ~10 us of worker CPU
# (measured), about a sixth of the signature pass; spool=plain costs disk instead.
_SPOOL_CCTX = zstandard.ZstdCompressor(level=1)


def _progress(cfg: DedupConfig, **kw):
    from tqdm import tqdm

    return tqdm(disable=not cfg.progress, dynamic_ncols=True, **kw)


# --- restartable stages --------------------------------------------------------------------


class _Work:
    """The work directory: each stage's files are complete when its marker JSON exists and
    carries the fingerprint of the inputs and of every parameter the stage depends on."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path = path
        self.fingerprint = fingerprint
        path.mkdir(parents=True, exist_ok=True)

    @property
    def fingerprint(self) -> dict:
        return self._fingerprint

    @fingerprint.setter
    def fingerprint(self, value: dict) -> None:
        # As JSON gives it back (tuples become lists), so a marker compares equal.
        self._fingerprint = json.loads(json.dumps(value, default=str))

    def file(self, name: str) -> Path:
        return self.path / name

    def done(self, stage: str) -> dict | None:
        marker = self.file(f"{stage}.done.json")
        if not marker.exists():
            return None
        info = json.loads(marker.read_text())
        return info if info.get("fingerprint") == self.fingerprint else None

    def finish(self, stage: str, info: dict) -> dict:
        info = {**info, "fingerprint": self.fingerprint}
        tmp = self.file(f".{stage}.done.json.tmp")
        tmp.write_text(json.dumps(info, default=str))
        tmp.replace(self.file(f"{stage}.done.json"))
        return info

    def invalidate_from(self, stages: list[str]) -> None:
        for s in stages:
            self.file(f"{s}.done.json").unlink(missing_ok=True)


def _stage_signatures(cfg: DedupConfig, files: list[Path], work: _Work, hasher_params: dict):
    rejects_path(cfg.output).unlink(missing_ok=True)  # a stale one would describe other input
    rejects = Rejects(rejects_path(cfg.output))
    sig_tmp, hash_tmp = work.file("signatures.u32.tmp"), work.file("hashes.u32.tmp")
    if cfg.spool not in ("plain", "zstd"):
        raise ValueError(f"spool must be plain or zstd, got {cfg.spool!r}")
    spool_name = "docs.jsonl.zst" if cfg.spool == "zstd" else "docs.jsonl"
    spool_tmp = work.file(spool_name + ".tmp")
    counts, sizes = [], []
    n_docs = 0
    workers = _workers(cfg)
    for stale in work.path.glob("part-*"):  # of a killed run
        stale.unlink()
    tasks = ((*t, str(work.path)) for t in _line_tasks(files, cfg.batch_bytes, cfg.spool == "zstd"))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fh, fd = os.open(hash_tmp, flags, 0o644), os.open(spool_tmp, flags, 0o644)
    src: dict[str, int] = {}
    with open(sig_tmp, "wb") as fs:
        with _progress(cfg, desc="dedup signatures", unit="doc") as bar:
            # Load (or, on a new machine, compile) the numba kernels once here; forked
            # workers inherit them.
            _init_worker(hasher_params)
            _HASHER.batch([b"warm up the compiled kernels"])
            if workers > 1:
                pool = _fork_pool(workers, hasher_params)
                results = pool.imap(_signature_task, tasks)
            else:
                pool = None
                results = map(_signature_task, tasks)
            try:
                for path, sigs, cnt, size, hashes, spool, bad in results:
                    for line, reason, raw in bad:
                        rejects.add(path, line, reason, raw)
                    fs.write(sigs.tobytes())
                    _copy_part(work, src, hashes, fh)
                    _copy_part(work, src, spool, fd)
                    counts.append(cnt)
                    sizes.append(size)
                    n_docs += len(sigs)
                    bar.update(len(sigs))
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
                _close_parts()
                for f in [fh, fd, *src.values()]:
                    os.close(f)
    for part in work.path.glob("part-*"):
        part.unlink()
    rejects.close()
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    if counts:
        np.cumsum(np.concatenate(counts), out=offsets[1:])
    np.save(work.file("shingle_offsets.npy"), offsets)
    spool_off = np.zeros(n_docs + 1, dtype=np.int64)
    if sizes:
        np.cumsum(np.concatenate(sizes), out=spool_off[1:])
    np.save(work.file("spool_offsets.npy"), spool_off)
    sig_tmp.replace(work.file("signatures.u32"))
    hash_tmp.replace(work.file("hashes.u32"))
    spool_tmp.replace(work.file(spool_name))
    return work.finish(
        "signatures",
        {
            "docs": n_docs,
            "shingles": int(offsets[-1]),
            "spool": spool_name,
            "rejects": rejects.report(),
        },
    )


def _signature_rows(work: _Work, num_perm: int, lo: int, hi: int) -> np.ndarray:
    """Signatures of documents lo..hi-1, read from disk. Plain reads rather than a memmap, so
    that pages already used do not stay in this process's resident set."""
    with open(work.file("signatures.u32"), "rb") as f:
        f.seek(4 * num_perm * lo)
        raw = f.read(4 * num_perm * (hi - lo))
    return np.frombuffer(raw, dtype=np.uint32).reshape(-1, num_perm)


def _stage_buckets(cfg: DedupConfig, work: _Work, n_docs: int, bands: int, rows: int):
    band_files = [work.file(f"band{k:03d}.u64") for k in range(bands)]
    handles = [open(p, "wb") for p in band_files]
    try:
        step = 1 << 14
        with _progress(cfg, desc="dedup band keys", unit="doc", total=n_docs) as bar:
            for lo in range(0, n_docs, step):
                sig = _signature_rows(work, cfg.num_perm, lo, min(lo + step, n_docs))
                keys = _band_keys(sig, rows, bands)
                for k, f in enumerate(handles):
                    f.write(np.ascontiguousarray(keys[:, k]).tobytes())
                bar.update(len(keys))
    finally:
        for f in handles:
            f.close()
    codes = []
    with _progress(cfg, desc="dedup buckets", unit="band", total=bands) as bar:
        for p in band_files:
            pairs = _bucket_pairs(np.fromfile(p, dtype=np.uint64), cfg.bucket_window)
            codes.append(pairs[:, 0] * n_docs + pairs[:, 1])
            p.unlink()
            bar.update(1)
    codes = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    pairs = np.stack([codes // max(n_docs, 1), codes % max(n_docs, 1)], axis=1)
    tmp = work.file("candidates.tmp.npy")
    np.save(tmp, pairs)
    tmp.replace(work.file("candidates.npy"))
    return work.finish("buckets", {"candidate_pairs": len(pairs)})


class _ShingleSets:
    """Exact shingle-hash sets of documents, read from the signature stage's files, with a
    bounded cache (a document is usually in several candidate pairs)."""

    def __init__(self, work: _Work, cache: int = 200_000):
        self.offsets = np.load(work.file("shingle_offsets.npy"))
        # Plain reads, not a memmap: readahead on a mapping pulls most of the file into this
        # process's resident set, and the sets of candidate documents are all we need.
        self.file = open(work.file("hashes.u32"), "rb")
        self.cache: dict[int, np.ndarray] = {}
        self.limit = cache

    def __getitem__(self, i: int) -> np.ndarray:
        s = self.cache.get(i)
        if s is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            self.file.seek(4 * lo)
            s = np.sort(np.frombuffer(self.file.read(4 * (hi - lo)), dtype=np.uint32))
            if len(s) > 1:  # the set: sorted, repeats dropped (cheaper than np.unique here)
                s = s[np.concatenate(([True], s[1:] != s[:-1]))]
            self.cache[i] = s
        return s

    def close(self) -> None:
        self.file.close()

    def jaccard(self, i: int, j: int) -> float:
        a, b = self[i], self[j]
        if len(a) == 0 and len(b) == 0:
            return 1.0
        inter = len(np.intersect1d(a, b, assume_unique=True))
        return inter / (len(a) + len(b) - inter)


def _estimated_jaccard(work: _Work, num_perm: int, pairs: np.ndarray) -> np.ndarray:
    """datasketch's MinHash.jaccard (fraction of equal slots) of each pair, reading only the
    signatures of documents that are in some pair."""
    docs = np.unique(pairs)
    sig = np.empty((len(docs), num_perm), dtype=np.uint32)
    with open(work.file("signatures.u32"), "rb") as f:
        for n, d in enumerate(docs.tolist()):
            f.seek(4 * num_perm * d)
            sig[n] = np.frombuffer(f.read(4 * num_perm), dtype=np.uint32)
    a, b = np.searchsorted(docs, pairs[:, 0]), np.searchsorted(docs, pairs[:, 1])
    est = np.empty(len(pairs), dtype=np.float64)
    step = 1 << 14
    for lo in range(0, len(pairs), step):
        est[lo : lo + step] = (sig[a[lo : lo + step]] == sig[b[lo : lo + step]]).mean(axis=1)
    return est


def _stage_clusters(cfg: DedupConfig, work: _Work, n_docs: int):
    pairs = np.load(work.file("candidates.npy"))
    est = _estimated_jaccard(work, cfg.num_perm, pairs) if len(pairs) else np.zeros(0)
    sim = est.copy()
    checked = np.zeros(len(pairs), dtype=bool)
    if cfg.verify == "exact":
        sets = _ShingleSets(work)
        todo = np.flatnonzero(est >= cfg.threshold - cfg.prefilter_margin)
        with _progress(cfg, desc="dedup verify", unit="pair", total=len(todo)) as bar:
            for n, t in enumerate(todo):
                sim[t] = sets.jaccard(int(pairs[t, 0]), int(pairs[t, 1]))
                if n % 4096 == 4095:
                    bar.update(4096)
            bar.update(len(todo) % 4096)
        sets.close()
        checked[todo] = True
    elif cfg.verify == "signature":
        checked[:] = True
    else:
        raise ValueError(f"verify must be exact or signature, got {cfg.verify!r}")
    verified = checked & (sim >= cfg.threshold)
    edges = pairs[verified]

    # Union-find over verified pairs; each cluster keeps its smallest index (first in input).
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    for i, j in edges.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the root is always the cluster's first doc
    sizes: dict[int, int] = {}
    removed = []
    for x in parent:
        r = find(x)
        sizes[r] = sizes.get(r, 1) + 1
        removed.append(x)
    keep = np.ones(n_docs, dtype=bool)
    if removed:
        keep[np.array(removed, dtype=np.int64)] = False
    np.save(work.file("keep.tmp.npy"), keep)
    work.file("keep.tmp.npy").replace(work.file("keep.npy"))

    v_idx = np.flatnonzero(verified)
    v_idx = v_idx[np.argsort(sim[v_idx], kind="stable")]
    spread = np.unique(np.linspace(0, len(v_idx) - 1, cfg.examples).astype(int))
    picks = v_idx[spread] if len(v_idx) and cfg.examples else []
    rejected = np.flatnonzero(checked & ~verified)
    near = rejected[np.argsort(-sim[rejected], kind="stable")[: min(3, cfg.examples)]]

    def pair_info(t: int) -> dict:
        return {
            "docs": [int(pairs[t, 0]), int(pairs[t, 1])],
            "jaccard": round(float(sim[t]), 4),
            "estimated_jaccard": round(float(est[t]), 4),
        }

    return work.finish(
        "clusters",
        {
            "candidate_pairs": len(pairs),
            "prefiltered_pairs": int((~checked).sum()),
            "verified_pairs": int(verified.sum()),
            "clusters": len(sizes),
            "largest_cluster": max(sizes.values(), default=1),
            "docs_removed": len(removed),
            "examples": [pair_info(t) for t in picks],
            "closest_rejected": [pair_info(t) for t in near],
        },
    )


def _read_exactly(f, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            raise RuntimeError("the spool is shorter than its offsets say (truncated?)")
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _stage_write(cfg: DedupConfig, work: _Work, n_docs: int, spool: str, want: set):
    """Copy the kept documents from the spool (document k is its line k, already in output
    form, at spool_offsets[k]) to the output, atomically: a block of the spool at a time, one
    write per run of kept documents. No JSON is parsed here, except for the few documents
    whose ids the report names."""
    keep = np.load(work.file("keep.npy"))
    off = np.load(work.file("spool_offsets.npy"))
    if len(keep) != n_docs or len(off) != n_docs + 1:
        raise RuntimeError("keep.npy or spool_offsets.npy do not match the document count")
    ids: dict[int, str] = {}
    block = 8 << 20  # bytes of spool held at a time (at least one document)
    with open(work.file(spool), "rb") as raw, AtomicWriter(cfg.output) as out:
        f = zstandard.ZstdDecompressor().stream_reader(raw) if spool.endswith(".zst") else raw
        with _progress(cfg, desc="dedup write", unit="doc", total=n_docs) as bar:
            lo = 0
            while lo < n_docs:
                hi = int(np.searchsorted(off, off[lo] + block, side="right")) - 1
                hi = min(max(hi, lo + 1), n_docs)
                data = memoryview(_read_exactly(f, int(off[hi] - off[lo])))
                k = keep[lo:hi]
                # runs of kept documents: [starts[i], ends[i]) relative to lo
                edges = np.flatnonzero(np.diff(k.astype(np.int8), prepend=0, append=0))
                for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                    out.write_bytes(data[off[lo + a] - off[lo] : off[lo + b] - off[lo]])
                for d in want:
                    if lo <= d < hi:
                        line = bytes(data[off[d] - off[lo] : off[d + 1] - off[lo]])
                        ids[d] = loads_line(line)["id"]
                bar.update(hi - lo)
                lo = hi
        if f.read(1):
            raise RuntimeError("the spool is longer than its offsets say")
    return int(keep.sum()), ids


def _workers(cfg: DedupConfig) -> int:
    return cfg.workers or min(2, os.cpu_count() or 1)


def _fork_pool(workers: int, hasher_params: dict):
    # fork: workers inherit the loaded numba kernels (and _HASHER) instead of loading them
    # again. Without fork, each worker builds its MinHasher and loads the kernels itself.
    if "fork" in mp.get_all_start_methods():
        return mp.get_context("fork").Pool(workers)
    return mp.Pool(workers, _init_worker, (hasher_params,))


# --- the stage -----------------------------------------------------------------------------


def run(cfg: DedupConfig) -> dict:
    """Run (or resume) the dedup stage; returns the report written beside the output."""
    t_start = time.perf_counter()
    if not 0.0 < cfg.threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {cfg.threshold}")
    files = expand_inputs(cfg.input)
    cand_j = cfg.candidate_jaccard or max(cfg.threshold - 0.05, 0.01)
    if cfg.bands and cfg.rows:
        bands, rows = cfg.bands, cfg.rows
    else:
        bands, rows = choose_banding(cfg.num_perm, cand_j, cfg.candidate_recall)
    if bands * rows > cfg.num_perm:
        raise ValueError(f"bands x rows = {bands * rows} > num_perm = {cfg.num_perm}")
    hasher_params = dict(
        num_perm=cfg.num_perm,
        seed=cfg.seed,
        ngram=cfg.ngram,
        scheme=cfg.scheme,
        backend=cfg.backend,
    )
    MinHasher(**hasher_params)  # validates the parameters before any work
    inputs = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    out = Path(cfg.output)
    work_path = Path(cfg.work_dir) if cfg.work_dir else out.with_name(out.name + ".dedup-work")
    params = {k: v for k, v in hasher_params.items() if k != "backend"}
    fp = {"inputs": inputs, **params}
    timings, resumed = {}, []

    work = _Work(work_path, fp)
    t = time.perf_counter()
    sig_info = work.done("signatures")
    if sig_info is None:
        work.invalidate_from(["buckets", "clusters"])
        sig_info = _stage_signatures(cfg, files, work, hasher_params)
    else:
        resumed.append("signatures")
    timings["signatures"] = time.perf_counter() - t
    n_docs = sig_info["docs"]

    work.fingerprint = {**fp, "bands": bands, "rows": rows, "window": cfg.bucket_window}
    t = time.perf_counter()
    if work.done("buckets") is None:
        work.invalidate_from(["clusters"])
        _stage_buckets(cfg, work, n_docs, bands, rows)
    else:
        resumed.append("buckets")
    timings["buckets"] = time.perf_counter() - t

    work.fingerprint = {
        **work.fingerprint,
        "threshold": cfg.threshold,
        "verify": cfg.verify,
        "prefilter_margin": cfg.prefilter_margin,
    }
    t = time.perf_counter()
    cl = work.done("clusters")
    if cl is None:
        cl = _stage_clusters(cfg, work, n_docs)
    else:
        resumed.append("clusters")
    timings["clusters"] = time.perf_counter() - t

    t = time.perf_counter()
    want = {d for e in cl["examples"] + cl["closest_rejected"] for d in e["docs"]}
    kept, ids = _stage_write(cfg, work, n_docs, sig_info["spool"], want)
    timings["write"] = time.perf_counter() - t
    for e in cl["examples"] + cl["closest_rejected"]:
        e["ids"] = [ids.get(d) for d in e["docs"]]
    if not cfg.keep_work:
        shutil.rmtree(work_path, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    report = {
        "stage": "dedup",
        "output": str(out),
        "docs_in": n_docs,
        "docs_out": kept,
        "docs_removed": n_docs - kept,
        "shingles": sig_info["shingles"],
        "candidate_pairs": cl["candidate_pairs"],
        "prefiltered_pairs": cl["prefiltered_pairs"],
        "verified_pairs": cl["verified_pairs"],
        "clusters": cl["clusters"],
        "largest_cluster": cl["largest_cluster"],
        "examples": cl["examples"],
        "closest_rejected": cl["closest_rejected"],
        "banding": {
            "bands": bands,
            "rows": rows,
            "p_candidate": {
                str(j): round(candidate_probability(j, bands, rows), 6)
                for j in (0.5, 0.8, 0.85, 0.9, 0.95, 0.97)
            },
        },
        "resumed_stages": resumed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "docs_per_s": round(n_docs / elapsed, 1) if elapsed > 0 else None,
        "config": to_container(cfg),
        "rejects": sig_info["rejects"],
    }
    write_report(cfg.output, report)
    return report


def main() -> None:
    stage_main("dedup", DedupConfig, run)


if __name__ == "__main__":
    main()
