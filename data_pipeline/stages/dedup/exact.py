"""The exact step: documents whose exact-duplicate keys are equal (the same words: the text as
the clean stage normalises whitespace, or re-wrapped) are removed, all but the first of each
group in input order, before the buckets step, so they never reach the MinHash steps. One task
per range of key values (the buckets step's `key_ranges`): a task holds about 1/key_ranges of
the keys (16 bytes per document) and equal keys always share a range."""

from __future__ import annotations

import numpy as np

from data_pipeline.runtime import scaleout
from data_pipeline.stages.dedup.corpus import Corpus, save_npy


def exact_groups(keys: np.ndarray, index: np.ndarray) -> np.ndarray:
    """[m, 2] int64 (document, canonical copy) for `keys` ([k, 2] uint64) of the documents
    `index` (global numbers): every document whose key an earlier document has, paired with
    that key's first document (the smallest number, as a MinHash cluster keeps its first)."""
    order = np.lexsort((index, keys[:, 1], keys[:, 0]))
    k, idx = keys[order], index[order]
    first = np.ones(len(idx), dtype=bool)
    first[1:] = (k[1:, 0] != k[:-1, 0]) | (k[1:, 1] != k[:-1, 1])
    group_first = idx[first][np.cumsum(first) - 1]
    dup = ~first
    return np.stack([idx[dup], group_first[dup]], axis=1).astype(np.int64)


class DedupExact(scaleout.TaskStep):
    """Task r: the exact duplicates among the documents whose key's high word lies in range r
    of the 2^64 values, as (document, canonical copy) rows in exact/removed-<r>.npy."""

    name = "exact"

    def task(self, rank: int, world_size: int) -> dict:
        corpus = Corpus(self.plan)
        ranges = self.plan.key_ranges
        k_lo = np.uint64((rank << 64) // ranges)
        k_hi = ((rank + 1) << 64) // ranges
        keys, index, start = [np.zeros((0, 2), np.uint64)], [np.zeros(0, np.int64)], 0
        for chunk in corpus.exact_key_chunks():
            hi_word = chunk[:, 0]
            mine = hi_word >= k_lo
            if k_hi != 1 << 64:
                mine &= hi_word < np.uint64(k_hi)
            where = np.flatnonzero(mine)
            keys.append(chunk[where])
            index.append(where + start)
            start += len(chunk)
        keys, index = np.concatenate(keys), np.concatenate(index)
        removed = exact_groups(keys, index)
        save_npy(self.work / "exact" / f"removed-{rank:05d}.npy", removed)
        return {"keys_held": len(keys), "exact_duplicates": len(removed)}
