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

Steps, each split into tasks on datatrove's executors (data_pipeline.runtime.scaleout: local processes
or Slurm job arrays), each task writing atomically into the work directory beside the output
(`<output>.dedup-work/`, removed after success unless `keep_work=true`) so it restarts alone:

1. signatures (one task per contiguous share of the input files): parse the lines as
   documents.read_documents does (the common line in compiled code, data_pipeline.kernels.jsonl_scan),
   compute MinHash signatures (data_pipeline.kernels.minhash, bit-identical to datasketch), the band
   keys of the run's banding, every document's shingle hashes and its line in output form
   (the spool, plain or zstd), into the task's own directory. Global document numbers are the
   tasks' documents in rank order: the input order.
2. buckets (one task per group of bands): each band's keys from every signature task;
   documents with equal keys become candidate pairs (keys are made again from the signatures
   if the banding changed on a re-run).
3. clusters (one task, over the candidate pairs only): prefilter by estimated Jaccard, verify
   on exact shingle sets, union-find over verified pairs, keep the first document of each
   cluster in global input order.
4. filter (one task per signature task): copy its kept documents' lines from its spool to
   its part file; the input is read and parsed once.
5. report: every task's statistics and rejects summed; a file output joins the parts.

The output is the same bytes for any tasks, workers and executor. Memory of a signature or
filter task follows its block size; of a buckets task, one band's keys (8 bytes per document);
of the cluster task, the candidate pairs and the documents in them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from omegaconf import MISSING

from data_pipeline import ownership
from data_pipeline.config_limits import AT_LEAST_1, NON_NEGATIVE, OneOf, Range, check_limits
from data_pipeline.documents import (
    TRUNCATED_ERRORS,
    AtomicWriter,
    InputLimits,
    LineRejected,
    Rejects,
    TooLong,
    document,
    dumps_doc,
    expand_inputs,
    iter_lines,
    json_object,
    loads_line,
    too_long_reason,
    truncated_reason,
)
from data_pipeline.kernels.jsonl_scan import FAST, SLOW, count_newlines, parse_block
from data_pipeline.kernels.minhash import BACKENDS, HAVE_NUMBA, SCHEMES, MinHasher
from data_pipeline.runtime import executors, scaleout
from data_pipeline.runtime.cli import rejects_path, stage_main, to_container, write_report

if HAVE_NUMBA:
    import numba


@dataclass
class DedupConfig(scaleout.ScaleOut):
    """Keys of `python -m data_pipeline.dedup` (docs/data-dedup.md explains each); the
    scale-out keys (tasks, workers, executor, slurm) are data_pipeline.runtime.scaleout's."""

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
    # Buckets tasks per group of bands, each over one range of band-key values, so a task
    # holds about 1/key_ranges of the keys; 0: one range per 32 GiB of input.
    key_ranges: int = 0
    batch_bytes: int = 1 << 20  # input bytes per block of a signature task
    backend: str = "auto"  # signature backend: auto | simd | openssl | numpy
    spool: str = "plain"  # the parsed documents kept for the write pass: plain | zstd
    work_dir: str = ""  # parent of opt-train-dedup.work/; unset: <output>.dedup-work
    keep_work: bool = False
    examples: int = 5  # example pairs in the report

    def __post_init__(self) -> None:
        super().__post_init__()
        check_limits(self, "", DEDUP_LIMITS)


# Allowed values (data_pipeline.config_limits); 0 means "chosen" where the comments say so.
DEDUP_LIMITS = {
    "threshold": Range(0, 1, lo_open=True),
    "ngram": AT_LEAST_1,
    "num_perm": AT_LEAST_1,
    "seed": NON_NEGATIVE,
    "scheme": OneOf(SCHEMES),
    "bands": NON_NEGATIVE,
    "rows": NON_NEGATIVE,
    "candidate_jaccard": Range(0, 1, hi_open=True),
    "candidate_recall": Range(0, 1, lo_open=True, hi_open=True),
    "verify": OneOf(("exact", "signature")),
    "prefilter_margin": Range(0, 1),
    "bucket_window": AT_LEAST_1,
    "key_ranges": NON_NEGATIVE,
    "batch_bytes": AT_LEAST_1,
    "backend": OneOf(("auto", *BACKENDS)),
    "spool": OneOf(("plain", "zstd")),
    "examples": NON_NEGATIVE,
}


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


_KEY_SEED = 0x243F6A8885A308D3
_KEY_MUL = 0x9E3779B97F4A7C15


def _band_keys_numpy(sig: np.ndarray, rows: int, bands: int) -> np.ndarray:
    """[docs, bands] uint64: one key per band; equal band values give equal keys. Keys of
    unequal values may collide (probability ~2^-64 per pair); that only adds a candidate,
    which verification rejects."""
    keys = np.empty((len(sig), bands), dtype=np.uint64)
    mul = np.uint64(_KEY_MUL)
    for k in range(bands):
        h = np.full(len(sig), _KEY_SEED, dtype=np.uint64)
        for j in range(k * rows, (k + 1) * rows):
            h ^= sig[:, j].astype(np.uint64)
            h *= mul
            h ^= h >> np.uint64(29)
        keys[:, k] = h
    return keys


if HAVE_NUMBA:

    @numba.njit(cache=True)
    def _band_keys_kernel(sig, rows, bands, keys):
        for d in range(sig.shape[0]):
            for k in range(bands):
                h = np.uint64(_KEY_SEED)
                for j in range(k * rows, (k + 1) * rows):
                    h ^= np.uint64(sig[d, j])
                    h *= np.uint64(_KEY_MUL)
                    h ^= h >> np.uint64(29)
                keys[d, k] = h


def _band_keys(sig: np.ndarray, rows: int, bands: int) -> np.ndarray:
    """The band keys of _band_keys_numpy, in one compiled pass over the signatures (the numpy
    form walks the signature matrix column by column, 7 times per band)."""
    if not HAVE_NUMBA:
        return _band_keys_numpy(sig, rows, bands)
    keys = np.empty((len(sig), bands), dtype=np.uint64)
    _band_keys_kernel(np.ascontiguousarray(sig), rows, bands, keys)
    return keys


if HAVE_NUMBA:

    @numba.njit(cache=True)
    def _shared_keys_kernel(keys, table, used, count):
        """Count each key in an open-addressing table (the keys are already hashes: their
        low bits are the slot), then list, in input order, the documents whose key occurs
        more than once."""
        mask = len(table) - 1
        slot_of = np.empty(len(keys), dtype=np.int64)
        for i in range(len(keys)):
            k = keys[i]
            s = np.int64(k & np.uint64(mask))
            while used[s] and table[s] != k:
                s = (s + 1) & mask
            used[s] = True
            table[s] = k
            count[s] += 1
            slot_of[i] = s
        out = np.empty(len(keys), dtype=np.int64)
        n = 0
        for i in range(len(keys)):
            if count[slot_of[i]] > 1:
                out[n] = i
                n += 1
        return out[:n]


def _shared_keys(keys: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the keys that occur more than once."""
    if not HAVE_NUMBA:
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        return np.flatnonzero(counts[inverse] > 1)
    size = 1 << max(int(2 * len(keys)).bit_length(), 4)  # load factor <= 1/2
    table = np.empty(size, dtype=np.uint64)
    used = np.zeros(size, dtype=np.bool_)
    count = np.zeros(size, dtype=np.int32)
    return _shared_keys_kernel(keys, table, used, count)


def _bucket_pairs(keys: np.ndarray, window: int) -> np.ndarray:
    """Candidate pairs (i < j, as [m, 2] int64) of documents with equal keys. Members of a
    bucket, in input order, are paired with their next `window` members: every pair in
    buckets of up to window + 1 documents, and a connected chain in larger ones (which are
    copies of one text: exact duplicates verify, so the chain links them all)."""
    shared = _shared_keys(keys)  # most documents share no key: sort only those that do
    order = shared[np.argsort(keys[shared], kind="stable")]
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


def _line_tasks(
    files: list[Path], size: int, zstd: bool, progress, limits: InputLimits
) -> Iterator[tuple]:
    """Signature tasks: (file, number of its first line, a block of whole lines, reject,
    zstd) with about `size` bytes of one file. Workers split and parse the lines, so neither
    the JSON work nor a Python step per line stays in this process. A compressed file is read
    as documents.iter_lines reads it (bounded reads; a line longer than `limits.max_line_bytes` is
    streamed past): a too-long line, or a truncation (at the line after the last complete
    one, as documents.iter_json_lines reports it), is a task with no lines carrying its reject
    (line, reason, raw, length), so rejects reach the rejects file in input order (this
    generator runs in the pool's feeder thread)."""
    for path in files:
        if path.suffix not in (".gz", ".zst"):
            yield from _plain_tasks(path, size, zstd, progress, limits)
            continue
        lineno, acc, n = 0, [], 0  # lines sent so far; the lines of the next block
        lines = iter_lines(path, progress, limits.max_line_bytes, limits.reject_text_bytes)
        try:
            for line in lines:
                if type(line) is TooLong:
                    if acc:
                        yield str(path), lineno + 1, b"".join(acc), None, zstd
                        lineno, acc, n = lineno + len(acc), [], 0
                    lineno += 1
                    reason = too_long_reason(limits.max_line_bytes)
                    yield str(path), lineno, b"", (lineno, reason, line.head, line.length), zstd
                    continue
                acc.append(line)
                n += len(line)
                if n >= size:
                    yield str(path), lineno + 1, b"".join(acc), None, zstd
                    lineno, acc, n = lineno + len(acc), [], 0
        except TRUNCATED_ERRORS as e:
            if acc:
                yield str(path), lineno + 1, b"".join(acc), None, zstd
                lineno += len(acc)
            yield str(path), lineno + 1, b"", (lineno + 1, truncated_reason(e), b"", None), zstd
            continue
        if acc:
            yield str(path), lineno + 1, b"".join(acc), None, zstd


def _plain_tasks(
    path: Path, size: int, zstd: bool, progress, limits: InputLimits
) -> Iterator[tuple]:
    """Tasks for an uncompressed file: (file, first line, (offset, length) of a block of
    whole lines, None, zstd). The worker reads the block itself; pickling 1 MiB blocks
    through the pool's pipe cost ~2-4 us per document (measured). The lines are still read
    here, to count them. A line longer than `limits.max_line_bytes` is a task with no lines
    and its reject, as in _line_tasks."""
    size = min(size, limits.max_line_bytes + 1)  # so no line of a block can be too long
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
                if n == len(buf) and len(buf) <= limits.max_line_bytes:  # a long line
                    buf = bytearray(min(2 * len(buf), limits.max_line_bytes + 1))
                    continue
                if n == len(buf):  # longer than max_line_bytes: streamed past
                    head, length = bytes(buf[: limits.reject_text_bytes]), n
                    f.seek(pos + n)
                    while part := f.readline(1 << 20):
                        length += len(part)
                        if part[-1] == 10:
                            break
                    reason = too_long_reason(limits.max_line_bytes)
                    yield str(path), lineno + 1, b"", (lineno + 1, reason, head, length), zstd
                    buf = bytearray(size)
                    progress.update(length)
                    lineno, pos = lineno + 1, pos + length
                    continue
                cut = n  # the last line, without a newline
            yield str(path), lineno + 1, (pos, cut), None, zstd
            progress.update(cut)
            lineno += count_newlines(buf, cut)
            pos += cut


_HASHER: MinHasher | None = None


def _init_worker(params: dict) -> None:
    global _HASHER
    _HASHER = MinHasher(**params)


def _parse_lines(block: bytes, first: int, name: str, parsed, rejects: list):
    """Texts (UTF-8) and output lines of a block's documents, each line parsed exactly as
    documents.read_documents does, except those jsonl_scan parsed already (`parsed`, or None)."""
    texts, out = [], []
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    last = first + len(lines) - 1  # the last line has a newline only if the block ends in one
    if parsed is not None:
        status, _, _, text, text_off, lines_out, out_off = parsed
        status, text_off, out_off = status.tolist(), text_off.tolist(), out_off.tolist()
    for k, raw in enumerate(lines):
        lineno = first + k
        if parsed is not None and status[k] != SLOW:
            if status[k] == FAST:
                texts.append(text[text_off[k] : text_off[k + 1]].tobytes())
                out.append(lines_out[out_off[k] : out_off[k + 1]].tobytes())
            continue
        try:
            obj = json_object(raw, ("text",))
            if obj is None:
                continue
            doc = document(obj, f"{name}:{lineno}")
        except LineRejected as e:
            bad = e.raw
            if bad is raw and (lineno < last or block.endswith(b"\n")):
                bad = raw + b"\n"  # the raw line as documents.iter_lines gives it, newline and all
            rejects.append((lineno, e.reason, bad))
            continue
        try:  # JSON allows lone surrogates, UTF-8 cannot hold them
            encoded = doc["text"].encode("utf-8")
        except UnicodeEncodeError as e:
            reason = f"text not encodable as UTF-8 ({e.reason}) id={doc['id']}"
            rejects.append((lineno, reason, b""))
            continue
        try:
            line = dumps_doc(doc)
        except UnicodeEncodeError as e:  # in the id or meta: the document cannot be written
            rejects.append((lineno, f"document not encodable as UTF-8 ({e.reason})", b""))
            continue
        texts.append(encoded)
        out.append(line)
    return texts, out


_READ_BUFFER = bytearray()


def _read_buffer(size: int) -> bytearray:
    """The block buffer of this worker, kept between tasks (no page faults for fresh
    memory); its bytes are valid until the next task."""
    global _READ_BUFFER
    if len(_READ_BUFFER) < size:
        _READ_BUFFER = bytearray(max(size, 2 * len(_READ_BUFFER)))
    return _READ_BUFFER


def _warm_up(hasher_params: dict, banding: tuple) -> None:
    """Load (on a new machine, compile) every kernel the tasks run, for the very argument
    types they pass (numba keys its compiled code on them: a read-only array is another type),
    in the process that forks the local task processes, so that they inherit them instead of
    each loading them again (~0.3 s per process for the line parser, measured)."""
    _init_worker(hasher_params)
    line = b'{"text": "warm up the compiled kernels", "id": "0"}\n'
    buf = bytearray(line + bytes(64))
    parsed = parse_block(buf, len(line))
    if parsed is not None:  # None: no compiled parser (numba missing)
        _, _, _, text, text_off, _, _ = parsed
        sigs = _HASHER.batch_joined(text, text_off[[0, 1]]).signatures
        _band_keys(sigs, banding[1], banding[0])
        keys = np.arange(8, dtype=np.uint64)
        _shared_keys(np.concatenate([keys, keys]))
        hashes, offs = np.arange(8, dtype=np.uint32), np.array([0, 4, 8], dtype=np.int64)
        _set_jaccard_kernel(hashes, offs, np.array([0]), np.array([1]), np.empty(1))
    _HASHER.batch([b"and those of the Python path"])


def _signature_task(task: tuple):
    """Parse a task's lines exactly as documents.read_documents does, and return the signatures and
    shingle hashes of its documents, the documents as output lines (one zstd frame: the
    spool the write stage copies kept documents from, so the input is parsed only once), and
    its rejects as (line, reason, raw) in line order. JSON allows lone surrogates, which UTF-8
    cannot encode: such a text is a reject (it could be neither hashed nor written)."""
    path, first, block, truncated, zstd, work_dir, banding = task
    if isinstance(block, tuple):  # (offset, length) in an uncompressed file
        size = block[1]
        buf = _read_buffer(size + 64)  # 64 spare bytes: the parser reads 64-byte chunks
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.preadv(fd, [memoryview(buf)[:size]], block[0]) != size:
                raise RuntimeError(f"{path}: shorter than when its lines were counted")
        finally:
            os.close(fd)
    else:
        size, buf = len(block), block
    name = Path(path).name
    rejects = []
    parsed = parse_block(buf, size)
    if parsed is not None and not (parsed[0] == SLOW).any():
        # The common case, every line compiled (jsonl_scan): no Python per document.
        status, _, _, text, text_off, lines_out, out_off = parsed
        fast = np.flatnonzero(status == FAST)
        t_off = np.concatenate(([0], text_off[fast + 1]))
        o_off = np.concatenate(([0], out_off[fast + 1]))
        b = _HASHER.batch_joined(text, t_off)
        out = [memoryview(lines_out)[: o_off[-1]]]
        sizes = np.diff(o_off)
    else:
        block = bytes(memoryview(buf)[:size])
        texts, out = _parse_lines(block, first, name, parsed, rejects)
        b = _HASHER.batch(texts)
        sizes = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
    if truncated:  # (line, reason, raw, length): a truncation or a too-long line
        rejects.append(truncated)
    keys = _band_keys(b.signatures, banding[1], banding[0])
    spool = out[0] if len(out) == 1 else b"".join(out)
    if zstd and len(spool):
        spool = _SPOOL_CCTX.compress(spool)
    # The shingle hashes and the spool (~5 KB per 3 KB document) stay in this process's own
    # part files, where later stages read them (the segments table says where): receiving
    # them through the pool's pipe cost the parent ~12 us of CPU per document, and copying
    # them into one file ~4 us (measured). Signatures and band keys (~650 bytes) come back.
    hashes = _append_part(work_dir, "hashes", b.hashes)
    spool = _append_part(work_dir, "spool", spool)
    return path, b.signatures, keys, np.diff(b.offsets), sizes, hashes, spool, rejects


_PARTS: dict[tuple, int] = {}  # (pid, work dir, kind) -> fd of a part file this process appends


def _append_part(work_dir: str, kind: str, data) -> tuple[str, int, int]:
    """Append `data` (bytes or a contiguous array) to this process's part file of `kind`:
    (its name, offset, length in bytes)."""
    name = f"part-{os.getpid()}.{kind}"
    key = (os.getpid(), work_dir, kind)
    fd = _PARTS.get(key)
    if fd is None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = _PARTS[key] = os.open(os.path.join(work_dir, name), flags, 0o644)
    offset = os.lseek(fd, 0, os.SEEK_CUR)
    view = memoryview(data).cast("B")
    length = len(view)
    while view:
        view = view[os.write(fd, view) :]
    return name, offset, length


def _close_parts() -> None:
    for key in [k for k in _PARTS if k[0] == os.getpid()]:
        os.close(_PARTS.pop(key))


# spool=zstd: level 1 keeps a 3 KB document in ~1/3 of its size for ~10 us of worker CPU
# (measured), about a sixth of the signature pass; spool=plain costs disk instead.
_SPOOL_CCTX = zstandard.ZstdCompressor(level=1)


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


# Columns of segments.npy, one row per signature task that had documents: where its documents'
# shingle hashes and spooled lines are. Document d of the task whose first document is
# FIRST <= d has its hashes at byte HASH_OFF + 4 * (shingle_offsets[d] - SHINGLE_BASE) of
# part-<PART>.hashes and its line at SPOOL_OFF + spool_offsets[d] - SPOOL_BASE of
# part-<PART>.spool (within the decompressed frame of SPOOL_LEN bytes at SPOOL_OFF when the
# spool is zstd).
FIRST, PART, HASH_OFF, SHINGLE_BASE, SPOOL_OFF, SPOOL_LEN, SPOOL_BASE = range(7)


def _signatures(
    cfg: DedupConfig,
    files: list[Path],
    work: _Work,
    hasher_params: dict,
    banding: tuple,
    rejects: Rejects,
    progress,
) -> dict:
    """Signatures, band keys, shingle hashes and spool of `files` into `work`, in this process
    (tasks, not threads or a pool inside a task, are how the stage uses more cores);
    `progress` is told the bytes of the files read."""
    sig_tmp = work.file("signatures.u32.tmp")
    if cfg.spool not in ("plain", "zstd"):
        raise ValueError(f"spool must be plain or zstd, got {cfg.spool!r}")
    counts, sizes, segments, parts = [], [], [], {}
    n_docs = n_shingles = n_spool = 0
    zstd = cfg.spool == "zstd"
    line_tasks = _line_tasks(files, cfg.batch_bytes, zstd, progress, InputLimits.of(cfg))
    tasks = ((*t, str(work.path), banding) for t in line_tasks)
    band_files = [work.file(f"band{k:03d}.u64") for k in range(banding[0])]
    handles = [open(f, "wb") for f in band_files]
    try:
        with open(sig_tmp, "wb") as fs:
            _init_worker(hasher_params)
            try:
                for path, sigs, keys, cnt, size, hashes, spool, bad in map(_signature_task, tasks):
                    for line, reason, raw, *length in bad:
                        rejects.add(path, line, reason, raw, *length)
                    if not len(sigs):
                        continue
                    fs.write(sigs)
                    for k, f in enumerate(handles):
                        f.write(np.ascontiguousarray(keys[:, k]))
                    part = parts.setdefault(hashes[0].split(".")[0], len(parts))
                    segments.append((n_docs, part, hashes[1], n_shingles, *spool[1:], n_spool))
                    counts.append(cnt)
                    sizes.append(size)
                    n_docs += len(sigs)
                    n_shingles += int(cnt.sum())
                    n_spool += int(size.sum())
            finally:
                _close_parts()
    finally:
        for f in handles:
            f.close()
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    if counts:
        np.cumsum(np.concatenate(counts), out=offsets[1:])
    np.save(work.file("shingle_offsets.npy"), offsets)
    spool_off = np.zeros(n_docs + 1, dtype=np.int64)
    if sizes:
        np.cumsum(np.concatenate(sizes), out=spool_off[1:])
    np.save(work.file("spool_offsets.npy"), spool_off)
    np.save(work.file("segments.npy"), np.array(segments, dtype=np.int64).reshape(-1, 7))
    work.file("band_keys.json").write_text(json.dumps(list(banding)))
    sig_tmp.replace(work.file("signatures.u32"))
    return work.finish(
        "signatures",
        {
            "docs": n_docs,
            "shingles": n_shingles,
            "spool": cfg.spool,
            "parts": sorted(parts, key=parts.get),
        },
    )


class _Parts:
    """Reads documents' shingle hashes and spooled lines from the workers' part files."""

    def __init__(self, work: _Work, info: dict):
        self.work = work
        self.names = info["parts"]
        self.zstd = info["spool"] == "zstd"
        self.seg = np.load(work.file("segments.npy"))
        self.shingle_off = np.load(work.file("shingle_offsets.npy"))
        self.spool_off = np.load(work.file("spool_offsets.npy"))
        self.fds: dict[tuple, int] = {}

    def _fd(self, part: int, kind: str) -> int:
        fd = self.fds.get((part, kind))
        if fd is None:
            path = self.work.file(f"{self.names[part]}.{kind}")
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


class _Corpus:
    """Every signature task's documents as one corpus in input order: global document d is
    document d - offsets[t] of task t (the tasks' shares are contiguous and in order)."""

    def __init__(self, plan: _Plan):
        self.dirs = [plan.sig_dir(r) for r in range(plan.tasks)]
        self.infos = [json.loads((d / "signatures.done.json").read_text()) for d in self.dirs]
        self.offsets = np.cumsum([0] + [i["docs"] for i in self.infos]).astype(np.int64)
        self.n_docs = int(self.offsets[-1])
        self.num_perm = plan.cfg.num_perm
        self._parts: dict[int, _Parts] = {}

    def parts(self, t: int) -> _Parts:
        if t not in self._parts:
            self._parts[t] = _Parts(_Work(self.dirs[t], {}), self.infos[t])
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
        """As _Parts.hashes, for sorted global document numbers."""
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
                    yield _band_keys(np.ascontiguousarray(sig), rows, 1)[:, 0]

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


def _set_jaccard_numpy(hashes: np.ndarray, offs: np.ndarray, ia, ib, out) -> None:
    sets = []
    for k in range(len(offs) - 1):
        s = np.sort(hashes[offs[k] : offs[k + 1]])
        if len(s) > 1:  # the set: sorted, repeats dropped (cheaper than np.unique here)
            s = s[np.concatenate(([True], s[1:] != s[:-1]))]
        sets.append(s)
    for p, (i, j) in enumerate(zip(ia.tolist(), ib.tolist(), strict=True)):
        a, b = sets[i], sets[j]
        if len(a) == 0 and len(b) == 0:
            out[p] = 1.0
            continue
        inter = len(np.intersect1d(a, b, assume_unique=True))
        out[p] = inter / (len(a) + len(b) - inter)


if HAVE_NUMBA:

    @numba.njit(cache=True)
    def _set_jaccard_kernel(hashes, offs, ia, ib, out):
        """out[p] = Jaccard of the shingle-hash sets of documents ia[p] and ib[p], document k
        being hashes[offs[k]:offs[k+1]], sorted (deduplicated here, in place)."""
        n = len(offs) - 1
        size = np.empty(n, dtype=np.int64)
        for k in range(n):
            lo, hi = offs[k], offs[k + 1]
            m = lo
            for t in range(lo, hi):
                if t == lo or hashes[t] != hashes[m - 1]:
                    hashes[m] = hashes[t]
                    m += 1
            size[k] = m - lo
        for p in range(len(ia)):
            a, b = ia[p], ib[p]
            x, xe = offs[a], offs[a] + size[a]
            y, ye = offs[b], offs[b] + size[b]
            if size[a] == 0 and size[b] == 0:
                out[p] = 1.0
                continue
            inter = 0
            while x < xe and y < ye:  # branch-free merge of two sorted runs
                u, v = hashes[x], hashes[y]
                inter += u == v
                x += u <= v
                y += v <= u
            out[p] = inter / (size[a] + size[b] - inter)


def _sort_each(hashes: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """Each document's run of hashes sorted in place. One numpy sort per document: small
    sorts stay in cache (~1 us for 500 hashes); one sort of (document, hash) keys over the
    whole chunk was 20x slower here, numba's sort 15x (measured)."""
    bounds = offs.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        hashes[lo:hi].sort()
    return hashes


def _exact_jaccard(parts: _Corpus, pairs: np.ndarray, progress) -> np.ndarray:
    """Jaccard of the exact shingle sets of each pair, a chunk of pairs at a time, so memory
    follows the chunk (at most 2 x 8192 documents' hashes), not the corpus."""
    out = np.empty(len(pairs), dtype=np.float64)
    step = 8192
    for lo in range(0, len(pairs), step):
        chunk = pairs[lo : lo + step]
        docs, inv = np.unique(chunk, return_inverse=True)
        inv = inv.reshape(-1, 2)
        hashes, offs = parts.hashes(docs)
        ia, ib, res = inv[:, 0].copy(), inv[:, 1].copy(), out[lo : lo + len(chunk)]
        if HAVE_NUMBA:
            _set_jaccard_kernel(_sort_each(hashes, offs), offs, ia, ib, res)
        else:
            _set_jaccard_numpy(hashes, offs, ia, ib, res)
        progress.update(len(chunk))
    return out


def _estimated_jaccard(corpus: _Corpus, pairs: np.ndarray) -> np.ndarray:
    """datasketch's MinHash.jaccard (fraction of equal slots) of each pair, reading only the
    signatures of documents that are in some pair."""
    docs = np.unique(pairs)
    sig = corpus.signatures(docs)
    a, b = np.searchsorted(docs, pairs[:, 0]), np.searchsorted(docs, pairs[:, 1])
    est = np.empty(len(pairs), dtype=np.float64)
    step = 1 << 14
    for lo in range(0, len(pairs), step):
        est[lo : lo + step] = (sig[a[lo : lo + step]] == sig[b[lo : lo + step]]).mean(axis=1)
    return est


def _clusters(cfg: DedupConfig, corpus: _Corpus, pairs: np.ndarray) -> tuple[np.ndarray, dict]:
    """Verify each candidate pair, union-find over verified pairs; (keep mask, statistics)."""
    n_docs = corpus.n_docs
    est = _estimated_jaccard(corpus, pairs) if len(pairs) else np.zeros(0)
    sim = est.copy()
    checked = np.zeros(len(pairs), dtype=bool)
    if cfg.verify == "exact":
        todo = np.flatnonzero(est >= cfg.threshold - cfg.prefilter_margin)
        with scaleout.progress(cfg, "dedup verify", len(todo), "pair") as bar:
            sim[todo] = _exact_jaccard(corpus, pairs[todo], bar)
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

    v_idx = np.flatnonzero(verified)
    v_idx = v_idx[np.argsort(sim[v_idx], kind="stable")]
    spread = np.unique(np.linspace(0, len(v_idx) - 1, cfg.examples).astype(int))
    picks = v_idx[spread] if len(v_idx) and cfg.examples else []
    rejected = np.flatnonzero(checked & ~verified)
    near = rejected[np.argsort(-sim[rejected], kind="stable")[: min(3, cfg.examples)]]

    def pair_info(t: int) -> dict:
        docs = [int(pairs[t, 0]), int(pairs[t, 1])]
        return {
            "docs": docs,
            "ids": [corpus.doc_id(d) for d in docs],
            "jaccard": round(float(sim[t]), 4),
            "estimated_jaccard": round(float(est[t]), 4),
        }

    return keep, {
        "candidate_pairs": len(pairs),
        "prefiltered_pairs": int((~checked).sum()),
        "verified_pairs": int(verified.sum()),
        "clusters": len(sizes),
        "largest_cluster": max(sizes.values(), default=1),
        "docs_removed": len(removed),
        "examples": [pair_info(t) for t in picks],
        "closest_rejected": [pair_info(t) for t in near],
    }


class _Writeback:
    """Starts the disk writes of a file being written every 16 MiB (Linux sync_file_range,
    asynchronous), so that the fsync that makes the output durable at the end waits for the
    last few MiB instead of the whole file: it was half of the write stage (measured ~40 ms
    of ~80 for 60 MB). A no-op where sync_file_range is missing."""

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


def _write_kept(parts: _Parts, keep: np.ndarray, output: Path, progress) -> int:
    """Copy the kept documents of one signature task from its spool (document k is its line k,
    already in output form) to `output`, atomically: a segment of the spool at a time, one
    write per run of kept documents. No JSON is parsed here."""
    off = parts.spool_off
    n_docs = len(off) - 1
    if len(keep) != n_docs:
        raise RuntimeError("keep.npy does not match the document count of the spool")
    done = 0
    with AtomicWriter(output) as out, _Writeback(out.tmp) as writeback:
        for lo, hi, row in parts.segments():
            data, base = parts.spool(row, lo, hi), off[lo]
            k = keep[lo:hi]
            # runs of kept documents: [edges[2i], edges[2i+1]) relative to lo
            edges = np.flatnonzero(np.diff(k.astype(np.int8), prepend=0, append=0))
            cuts = (off[lo + edges] - base).tolist()
            for a, b in zip(cuts[::2], cuts[1::2], strict=True):
                out.write_bytes(data[a:b])
            writeback.poke(len(data))
            progress.update(hi - lo)
            done = hi
        if done != n_docs:
            raise RuntimeError("the spool segments do not cover every document")
    return int(keep.sum())


# --- the stage as tasks (data_pipeline.runtime.scaleout) ---------------------------------------------

_BYTES_PER_TASK = 256 << 20  # tasks=0: one signature task per 256 MiB of input
_BYTES_PER_KEY_RANGE = 32 << 30  # key_ranges=0: one buckets range per 32 GiB of input
_PART_SUFFIX = ".jsonl.zst"
_STEPS = ("signatures", "buckets", "clusters", "filter", "report")


class _Plan:
    """What every task of one run agrees on: inputs, shares, banding, where files go."""

    def __init__(self, cfg: DedupConfig):
        if not 0.0 < cfg.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {cfg.threshold}")
        if cfg.spool not in ("plain", "zstd"):
            raise ValueError(f"spool must be plain or zstd, got {cfg.spool!r}")
        if cfg.verify not in ("exact", "signature"):
            raise ValueError(f"verify must be exact or signature, got {cfg.verify!r}")
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.files = expand_inputs(cfg.input)
        sizes = [p.stat().st_size for p in self.files]
        self.tasks = scaleout.auto_tasks(cfg, sum(sizes), _BYTES_PER_TASK, len(self.files))
        self.shares = scaleout.contiguous_shares(sizes, self.tasks)
        cand_j = cfg.candidate_jaccard or max(cfg.threshold - 0.05, 0.01)
        if cfg.bands and cfg.rows:
            self.bands, self.rows = cfg.bands, cfg.rows
        else:
            self.bands, self.rows = choose_banding(cfg.num_perm, cand_j, cfg.candidate_recall)
        if self.bands * self.rows > cfg.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} > num_perm = {cfg.num_perm}")
        self.band_tasks = min(self.tasks, self.bands)
        self.band_shares = scaleout.even_shares(self.bands, self.band_tasks)
        if cfg.key_ranges < 0:
            raise ValueError(f"key_ranges={cfg.key_ranges}: must be >= 0")
        self.key_ranges = cfg.key_ranges or max(1, -(-sum(sizes) // _BYTES_PER_KEY_RANGE))
        self.bucket_tasks = self.band_tasks * self.key_ranges
        self.hasher_params = dict(
            num_perm=cfg.num_perm,
            seed=cfg.seed,
            ngram=cfg.ngram,
            scheme=cfg.scheme,
            backend=cfg.backend,
        )
        self.work = ownership.work_dir(
            cfg.work_dir, "dedup", self.out.with_name(self.out.name + ".dedup-work")
        )
        self.to_file = scaleout.is_file_output(self.out)
        self.parts = self.work / "filter"  # published as the output by the report step

    def step_counts(self) -> dict[str, int]:
        return dict(zip(_STEPS, (self.tasks, self.bucket_tasks, 1, self.tasks, 1), strict=True))

    def fingerprints(self) -> list[tuple[str, dict]]:
        """Each step's files depend on its own entry and every earlier one."""
        cfg = self.cfg
        files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]
        params = {k: v for k, v in self.hasher_params.items() if k != "backend"}
        return [
            (
                "signatures",
                {
                    "inputs": files,
                    "tasks": self.tasks,
                    "spool": cfg.spool,
                    "limits": InputLimits.of(cfg).fingerprint(),
                    **params,
                },
            ),
            (
                "buckets",
                {
                    "banding": [self.bands, self.rows],
                    "window": cfg.bucket_window,
                    "key_ranges": self.key_ranges,
                },
            ),
            (
                "clusters",
                {
                    "threshold": cfg.threshold,
                    "verify": cfg.verify,
                    "prefilter_margin": cfg.prefilter_margin,
                    "examples": cfg.examples,
                },
            ),
            ("filter", {"output": str(self.out.resolve())}),
            ("report", {}),
        ]

    def sig_dir(self, rank: int) -> Path:
        return self.work / "signatures" / f"task-{rank:05d}"

    def part(self, rank: int) -> Path:
        return self.parts / f"part-{rank:05d}{_PART_SUFFIX}"


class DedupSignatures(scaleout.TaskStep):
    """Task r: MinHash signatures, band keys, shingle hashes and the parsed lines (spool) of its
    contiguous share of the input files, in its own directory."""

    name = "signatures"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        lo, hi = plan.shares[rank]
        final = plan.sig_dir(rank)
        tmp = scaleout.fresh_task_dir(final)
        rejects = Rejects(tmp / "rejects.jsonl", InputLimits.of(self.cfg))
        files = plan.files[lo:hi]
        desc = f"dedup signatures task {rank}/{world_size}"
        try:
            with scaleout.progress(
                self.cfg, desc, sum(f.stat().st_size for f in files), "B"
            ) as bar:
                info = _signatures(
                    self.cfg,
                    files,
                    _Work(tmp, {}),
                    plan.hasher_params,
                    (plan.bands, plan.rows),
                    rejects,
                    bar,
                )
        finally:
            rejects.close()
        tmp.replace(final)
        return {
            "files": hi - lo,
            "docs": info["docs"],
            "shingles": info["shingles"],
            "rejects": rejects.report(),
        }


class DedupBuckets(scaleout.TaskStep):
    """Task t: the candidate pairs of group g = t // key_ranges of the bands, among the
    documents whose band key lies in range t % key_ranges of the 2^64 key values. Documents
    with equal keys share a range, so the ranges' pairs together are the whole group's; a
    task holds only its range's keys (about 1/key_ranges of them, with their indices)."""

    name = "buckets"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        corpus = _Corpus(plan)
        n = max(corpus.n_docs, 1)
        lo, hi = plan.band_shares[rank // plan.key_ranges]
        r, ranges = rank % plan.key_ranges, plan.key_ranges
        k_lo, k_hi = np.uint64((r << 64) // ranges), ((r + 1) << 64) // ranges
        k_hi = None if k_hi == 1 << 64 else np.uint64(k_hi)
        codes, held = [np.zeros(0, np.int64)], 0
        with scaleout.progress(
            self.cfg, f"dedup buckets task {rank}/{world_size}", hi - lo, "band"
        ) as bar:
            for k in range(lo, hi):
                if ranges == 1:  # every key: read whole, no filtering
                    chunks = corpus.band_key_chunks(k, plan.bands, plan.rows, step=1 << 62)
                    keys = np.concatenate([np.zeros(0, np.uint64), *chunks])
                    held = max(held, len(keys))
                    pairs = _bucket_pairs(keys, self.cfg.bucket_window)
                    codes.append(pairs[:, 0] * n + pairs[:, 1])
                    bar.update(1)
                    continue
                keys, index, start = [], [], 0
                for chunk in corpus.band_key_chunks(k, plan.bands, plan.rows):
                    mine = chunk >= k_lo if k_hi is None else (chunk >= k_lo) & (chunk < k_hi)
                    where = np.flatnonzero(mine)
                    keys.append(chunk[where])
                    index.append(where + start)
                    start += len(chunk)
                keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
                index = np.concatenate(index) if index else np.zeros(0, np.int64)
                held = max(held, len(keys))
                pairs = index[_bucket_pairs(keys, self.cfg.bucket_window)]
                codes.append(pairs[:, 0] * n + pairs[:, 1])
                del keys, index
                bar.update(1)
        codes = np.unique(np.concatenate(codes))
        _save_npy(self.work / "buckets" / f"pairs-{rank:05d}.npy", codes)
        return {"bands": hi - lo, "pair_codes": len(codes), "keys_held": held}


class DedupClusters(scaleout.TaskStep):
    """One task over the candidate pairs only: prefilter by estimated Jaccard, exact Jaccard,
    union-find, keep the first document of each cluster in input order."""

    name = "clusters"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        corpus = _Corpus(plan)
        n = max(corpus.n_docs, 1)
        groups = [
            np.load(self.work / "buckets" / f"pairs-{t:05d}.npy") for t in range(plan.bucket_tasks)
        ]
        codes = np.unique(np.concatenate(groups)) if groups else np.zeros(0, np.int64)
        pairs = np.stack([codes // n, codes % n], axis=1)
        try:
            keep, info = _clusters(self.cfg, corpus, pairs)
        finally:
            corpus.close()
        _save_npy(self.work / "clusters" / "keep.npy", keep)
        return info


class DedupFilter(scaleout.TaskStep):
    """Task r: the kept documents of signature task r's share, from its spool, as part r."""

    name = "filter"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        corpus = _Corpus(plan)
        keep = np.load(self.work / "clusters" / "keep.npy")
        if len(keep) != corpus.n_docs:
            raise RuntimeError("keep.npy does not match the document count")
        lo, hi = int(corpus.offsets[rank]), int(corpus.offsets[rank + 1])
        part = plan.part(rank)
        scaleout.remove_stale(part.parent, f".{part.name}.tmp-*")  # of a killed attempt
        try:
            desc = f"dedup filter task {rank}/{world_size}"
            with scaleout.progress(self.cfg, desc, hi - lo, "doc") as bar:
                kept = _write_kept(corpus.parts(rank), keep[lo:hi], part, bar)
        finally:
            corpus.close()
        return {"docs_in": hi - lo, "docs_out": kept}


class DedupReport(scaleout.TaskStep):
    """One task: the stage report (every task's statistics), the rejects of every signature
    task in input order, and for a file output the parts joined into it."""

    name = "report"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        counts = plan.step_counts()
        st = {s: scaleout.task_stats(self.work, s, counts[s]) for s in _STEPS[:-1]}
        rejects = scaleout.gather_rejects(
            [plan.sig_dir(r) / "rejects.jsonl" for r in range(plan.tasks)],
            [s["rejects"] for s in st["signatures"]],
            rejects_path(plan.out),
        )
        scaleout.finish_parts([plan.part(r) for r in range(plan.tasks)], plan.out, plan.to_file)
        cl = st["clusters"][0]
        docs_in = sum(s["docs"] for s in st["signatures"])
        docs_out = sum(s["docs_out"] for s in st["filter"])
        report = {
            "stage": "dedup",
            "output": str(plan.out),
            "tasks": {s: counts[s] for s in _STEPS[:-1]},
            "docs_in": docs_in,
            "docs_out": docs_out,
            "docs_removed": docs_in - docs_out,
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
            "timings_s": {s: round(sum(t["seconds"] for t in st[s]), 3) for s in st},
            "cpu_s": {s: round(sum(t["cpu_s"] for t in st[s]), 3) for s in st},
            "max_rss_mb": {s: max(t["max_rss_mb"] for t in st[s]) for s in st},
            "config": to_container(self.cfg),
            "rejects": rejects.report(),
        }
        write_report(plan.out, report)
        return {"docs_out": docs_out}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    tmp.replace(path)


def run(cfg: DedupConfig) -> dict:
    """signatures -> buckets -> clusters -> filter -> report on the configured executor;
    returns the stage report (with slurm.wait=false, the submitted job ids)."""
    t0 = time.perf_counter()
    scaleout.validate(cfg)
    plan = _Plan(cfg)
    MinHasher(**plan.hasher_params)  # validates the parameters before any work
    with scaleout.owned(plan, "dedup"):
        scaleout.prepare(plan, plan.fingerprints())
        counts = plan.step_counts()
        resumed = [s for s in _STEPS[:3] if scaleout.completed(plan.work, s, counts[s])]
        steps = [
            (cls(plan), counts[cls.name])
            for cls in (DedupSignatures, DedupBuckets, DedupClusters, DedupFilter, DedupReport)
        ]
        if cfg.executor == "local":
            _warm_up(plan.hasher_params, (plan.bands, plan.rows))
        jobs = executors.run_steps(steps, cfg, plan.work)
        report = scaleout.finish("dedup", plan, jobs, t0, "docs_in", "docs_per_s")
    if "slurm_jobs" not in report:
        report["resumed_stages"] = resumed
        write_report(plan.out, report)
    return report


def main() -> None:
    # Through the module's import name, not __main__: the executors pickle the steps, and a
    # class of __main__ would be pickled by value, without the module's other names.
    from data_pipeline.stages import dedup

    stage_main("dedup", dedup.DedupConfig, dedup.run)


if __name__ == "__main__":
    main()
