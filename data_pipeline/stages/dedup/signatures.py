"""The signatures step: each task parses its share of the input once and leaves, in its own
directory, the documents' MinHash signatures, band keys, exact-duplicate keys, shingle hashes
and output lines (the spool the filter step copies kept documents from)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import zstandard

from data_pipeline.documents import (
    InputLimits,
    LineRejected,
    Rejects,
    document,
    dumps_doc,
    json_object,
)
from data_pipeline.files import publish_dir
from data_pipeline.kernels.jsonl_scan import FAST, SLOW, parse_block
from data_pipeline.kernels.lsh import band_keys
from data_pipeline.kernels.minhash import MinHasher
from data_pipeline.kernels.scratch import scratch
from data_pipeline.runtime import scaleout
from data_pipeline.stages.dedup.blocks import line_tasks
from data_pipeline.stages.dedup.config import DedupConfig

# This process's hasher: made once per task (the permutations are drawn once), and by the
# local executor's parent before it forks, so the task processes inherit its loaded kernels.
HASHER: MinHasher | None = None


def load_hasher(params: dict) -> None:
    global HASHER
    HASHER = MinHasher(**params)


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


def _signature_task(task: tuple):
    """Parse a task's lines exactly as documents.read_documents does, and return the signatures and
    shingle hashes of its documents, the documents as output lines (one zstd frame: the
    spool the write stage copies kept documents from, so the input is parsed only once), and
    its rejects as (line, reason, raw) in line order. JSON allows lone surrogates, which UTF-8
    cannot encode: such a text is a reject (it could be neither hashed nor written)."""
    path, first, block, truncated, zstd, work_dir, banding = task
    if isinstance(block, tuple):  # (offset, length) in an uncompressed file
        size = block[1]
        buf = scratch("dedup.block", size + 64)  # 64 spare bytes: the parser reads 64-byte chunks
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
        b = HASHER.batch_joined(text, t_off, exact=True)
        out = [memoryview(lines_out)[: o_off[-1]]]
        sizes = np.diff(o_off)
    else:
        block = bytes(memoryview(buf)[:size])
        texts, out = _parse_lines(block, first, name, parsed, rejects)
        b = HASHER.batch(texts, exact=True)
        sizes = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
    if truncated:  # (line, reason, raw, length): a truncation or a too-long line
        rejects.append(truncated)
    keys = band_keys(b.signatures, banding[1], banding[0])
    spool = out[0] if len(out) == 1 else b"".join(out)
    if zstd and len(spool):
        spool = _SPOOL_CCTX.compress(spool)
    # The shingle hashes and the spool (several KB per document; sizes in docs/data-dedup.md,
    # "Steps and tasks on disk") are written once, to this process's own part files, where later
    # steps read them (segments.npy says where): copying them into one file would cost as much
    # again (docs/data-dedup.md, "Measured"). Only the signatures and band keys go back to the
    # caller (num_perm x 4 bytes plus 8 bytes per band: ~650 bytes at the defaults).
    hashes = _append_part(work_dir, "hashes", b.hashes)
    spool = _append_part(work_dir, "spool", spool)
    return path, b.signatures, keys, b.exact, np.diff(b.offsets), sizes, hashes, spool, rejects


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


# spool=zstd: level 1, the cheapest, keeps the spool in about a third of its size for a sixth
# more CPU in the signature pass (docs/data-dedup.md, "Measured"); spool=plain costs disk.
_SPOOL_CCTX = zstandard.ZstdCompressor(level=1)


def _signatures(
    cfg: DedupConfig,
    files: list[Path],
    work: Path,
    hasher_params: dict,
    banding: tuple,
    rejects: Rejects,
    progress,
) -> dict:
    """Signatures, band keys, shingle hashes and spool of `files` into the task directory
    `work`, in this process (tasks, not threads or a pool inside a task, are how the stage
    uses more cores); `progress` is told the bytes of the files read."""
    counts, sizes, segments, parts = [], [], [], {}
    n_docs = n_shingles = n_spool = 0
    blocks = line_tasks(files, cfg.batch_bytes, cfg.spool == "zstd", progress, InputLimits.of(cfg))
    tasks = ((*t, str(work), banding) for t in blocks)
    handles = [open(work / f"band{k:03d}.u64", "wb") for k in range(banding[0])]
    try:
        with open(work / "signatures.u32", "wb") as fs, open(work / "exact.u64", "wb") as fx:
            load_hasher(hasher_params)
            try:
                for path, sigs, keys, exact, cnt, size, hashes, spool, bad in map(
                    _signature_task, tasks
                ):
                    for line, reason, raw, *length in bad:
                        rejects.add(path, line, reason, raw, *length)
                    if not len(sigs):
                        continue
                    fs.write(sigs)
                    fx.write(exact)
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
    _write_index(work, counts, sizes, segments, banding)
    info = {
        "docs": n_docs,
        "shingles": n_shingles,
        "spool": cfg.spool,
        "parts": sorted(parts, key=parts.get),
    }
    (work / "signatures.done.json").write_text(json.dumps(info))
    return info


def _write_index(work: Path, counts: list, sizes: list, segments: list, banding: tuple) -> None:
    """Where each document's shingle hashes and spooled line are (the layout Corpus reads)."""
    for name, lengths in (("shingle_offsets.npy", counts), ("spool_offsets.npy", sizes)):
        offsets = np.zeros(sum(map(len, lengths)) + 1, dtype=np.int64)
        if lengths:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        np.save(work / name, offsets)
    np.save(work / "segments.npy", np.array(segments, dtype=np.int64).reshape(-1, 7))
    (work / "band_keys.json").write_text(json.dumps(list(banding)))


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
                    tmp,
                    plan.hasher_params,
                    (plan.bands, plan.rows),
                    rejects,
                    bar,
                )
        finally:
            rejects.close()
        publish_dir(tmp, final)
        return {
            "files": hi - lo,
            "docs": info["docs"],
            "shingles": info["shingles"],
            "rejects": rejects.report(),
        }
