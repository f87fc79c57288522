"""Batch provenance: the stored documents behind each rank's windows of a step.

The loader's order is a function of the seed, the skip list and the global sample number
(opt_train/data/loader.py), so the documents a step trained on are computed, never logged: the
step gives its global samples, each sample a window of one source, and each window the token
range [w * seq_len, w * seq_len + seq_len + 1) of that source's stream, which the shards'
document index cuts into documents. Windows span document boundaries (OPT packs documents
separated by `</s>`), so one window lists every document it touches, with the tokens of it.

What a document is named by: the source (its `data.sources` name; None for the `data.path`
shorthand), the shard (its number in the split and its file), and the document's number in
that shard (the shard's `.index` entry, as `data_pipeline.shards.iter_documents` counts them
within the shard). The shard format stores no per-document id (the `.index` file holds only
boundaries, the manifest only counts), so `id` is None for the project's shards.

Rank r of W takes the r-th W-th of each global batch (GlobalOrderLoader), so the documents of a
step at world size W are, over all r, the same as at world size 1: `world` is a parameter here,
and a step can be answered for any world size without launching it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from opt_train.data.loader import GlobalOrderLoader, PackedWindows


@dataclass(frozen=True)
class DocumentSpan:
    """The part of one stored document inside one window of a step."""

    rank: int  # the data-parallel rank that read the window
    sample: int  # the global sample number (the loader's order)
    window: int  # the window's index within its source's split
    source: str | None  # the `data.sources` name; None for the `data.path` shorthand
    path: str  # the source's shard directory
    shard: int  # the shard's number in the split
    shard_file: str  # its token file, e.g. train-00003.tokens
    doc: int  # the document's number within the shard
    doc_tokens: int  # the document's length, its separator excluded
    start: int  # the tokens [start, end) of the document that the window holds; end may be
    end: int  # doc_tokens + 1 when the window holds the separator after it
    offset: int  # where in the window (0..seq_len) the document's part begins
    id: str | None = None  # the pipeline's document id, where the shards record one

    def compact(self) -> list:
        """[source, shard, doc] (and the id, when known): what an event row carries."""
        return [self.source, self.shard, self.doc, *([self.id] if self.id is not None else [])]

    def as_dict(self) -> dict:
        return asdict(self)


def window_spans(windows: PackedWindows, w: int) -> list[tuple[int, int, int, int, int, int]]:
    """(shard, doc, doc_tokens, start, end, offset) of every document window `w` touches, in
    stream order. A window holds seq_len + 1 tokens (the inputs and the last target)."""
    r = windows.reader
    pos, end = w * windows.seq_len, w * windows.seq_len + windows.seq_len + 1
    out = []
    while pos < end:
        s = int(np.searchsorted(r.starts, pos, side="right")) - 1
        local = pos - int(r.starts[s])
        index = r.indexes[s]
        doc = int(np.searchsorted(index, local, side="right")) - 1
        first, after = int(index[doc]), int(index[doc + 1])  # after: past the separator
        n = min(end - pos, after - local)
        out.append(
            (s, doc, after - first - 1, local - first, local - first + n, pos - w * windows.seq_len)
        )
        pos += n
    return out


def step_start(loader: GlobalOrderLoader, step: int) -> int:
    """The first global sample of optimizer step `step` (1-based) under the loader's skip
    list: the same batch `GlobalOrderLoader.next_step` reads for that step in a run from step 1
    (batch b trains as original step b + 1; skipped original steps give their batch to none)."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    b = step - 1
    for first, last in _merged(loader.skip_steps):
        if b < first - 1:
            break
        b += last - first + 1
    return b * loader.global_batch


def batch_documents(
    loader: GlobalOrderLoader, start: int, world: int | None = None, rank: int | None = None
) -> list[DocumentSpan]:
    """Every document of the global batch that begins at global sample `start`, as read by
    `world` data-parallel ranks (the loader's, by default); only rank `rank`'s when given."""
    world = loader.world if world is None else world
    if loader.global_batch % world:
        raise ValueError(
            f"a global batch of {loader.global_batch} does not split over {world} ranks"
        )
    if rank is not None and not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of the {world} data-parallel ranks")
    per_rank = loader.global_batch // world
    spans = []
    for g in range(start, start + loader.global_batch):
        r = (g - start) // per_rank
        if rank is not None and r != rank:
            continue
        i, w = loader.sample(g)
        src = loader.sources[i]
        shards = src.windows.reader.manifest["splits"][src.windows.split]["shards"]
        for shard, doc, n, a, b, offset in window_spans(src.windows, w):
            spans.append(
                DocumentSpan(
                    rank=r,
                    sample=g,
                    window=w,
                    source=src.name,
                    path=str(src.windows.reader.path),
                    shard=shard,
                    shard_file=shards[shard]["tokens"],
                    doc=doc,
                    doc_tokens=n,
                    start=a,
                    end=b,
                    offset=offset,
                )
            )
    return spans


def step_documents(
    loader: GlobalOrderLoader, step: int, world: int | None = None, rank: int | None = None
) -> list[DocumentSpan]:
    """Every document of optimizer step `step` (see batch_documents)."""
    return batch_documents(loader, step_start(loader, step), world, rank)


def last_step_documents(loader: GlobalOrderLoader) -> list[DocumentSpan]:
    """The documents of the global batch the loader read last (every rank's): what a spike
    row names, computed the same on every rank."""
    return batch_documents(loader, loader.samples_seen - loader.global_batch)


def compact(spans: list[DocumentSpan]) -> list[list]:
    """Each document once, in the order first read: [source, shard, doc(, id)]."""
    seen: dict[tuple, list] = {}
    for s in spans:
        seen.setdefault((s.source, s.shard, s.doc), s.compact())
    return list(seen.values())


def _merged(ranges) -> list[tuple[int, int]]:
    """Skip ranges sorted, overlapping and adjacent ones joined."""
    out: list[list[int]] = []
    for first, last in sorted((int(a), int(b)) for a, b in ranges):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return [(a, b) for a, b in out]


__all__ = [
    "DocumentSpan",
    "batch_documents",
    "compact",
    "last_step_documents",
    "step_documents",
    "step_start",
    "window_spans",
]
