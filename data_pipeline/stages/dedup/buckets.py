"""The buckets step: documents whose band keys are equal become candidate pairs, one task per
group of bands and range of key values."""

from __future__ import annotations

import numpy as np

from data_pipeline.kernels.lsh import shared_keys
from data_pipeline.runtime import scaleout
from data_pipeline.stages.dedup.corpus import Corpus, save_npy


def _bucket_pairs(keys: np.ndarray, window: int) -> np.ndarray:
    """Candidate pairs (i < j, as [m, 2] int64) of documents with equal keys. Members of a
    bucket, in input order, are paired with their next `window` members: every pair in
    buckets of up to window + 1 documents, and a connected chain in larger ones (which are
    copies of one text: exact duplicates verify, so the chain links them all)."""
    shared = shared_keys(keys)  # most documents share no key: sort only those that do
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


def _not_exact_duplicates(corpus: Corpus, work, exact_tasks: int) -> np.ndarray | None:
    """Which documents the exact step left (a mask; None: it removed none)."""
    removed = corpus.exact_removed(work, exact_tasks)[:, 0]
    if not len(removed):
        return None
    alive = np.ones(corpus.n_docs, dtype=bool)
    alive[removed] = False
    return alive


class DedupBuckets(scaleout.TaskStep):
    """Task t: the candidate pairs of group g = t // key_ranges of the bands, among the
    documents whose band key lies in range t % key_ranges of the 2^64 key values. Documents
    with equal keys share a range, so the ranges' pairs together are the whole group's; a
    task holds only its range's keys (about 1/key_ranges of them, with their indices)."""

    name = "buckets"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        corpus = Corpus(plan)
        n = max(corpus.n_docs, 1)
        lo, hi = plan.band_shares[rank // plan.key_ranges]
        r, ranges = rank % plan.key_ranges, plan.key_ranges
        k_lo, k_hi = np.uint64((r << 64) // ranges), ((r + 1) << 64) // ranges
        k_hi = None if k_hi == 1 << 64 else np.uint64(k_hi)
        codes, held = [np.zeros(0, np.int64)], 0
        alive = _not_exact_duplicates(corpus, self.work, plan.step_counts()["exact"])
        left = np.flatnonzero(alive) if alive is not None and ranges == 1 else None
        with scaleout.progress(
            self.cfg, f"dedup buckets task {rank}/{world_size}", hi - lo, "band"
        ) as bar:
            for k in range(lo, hi):
                if ranges == 1:  # every key: read whole, no filtering
                    chunks = corpus.band_key_chunks(k, plan.bands, plan.rows, step=1 << 62)
                    keys = np.concatenate([np.zeros(0, np.uint64), *chunks])
                    if left is not None:  # only the documents the exact step left
                        keys = keys[left]
                    held = max(held, len(keys))
                    pairs = _bucket_pairs(keys, self.cfg.bucket_window)
                    if left is not None:
                        pairs = left[pairs]
                    codes.append(pairs[:, 0] * n + pairs[:, 1])
                    bar.update(1)
                    continue
                keys, index, start = [], [], 0
                for chunk in corpus.band_key_chunks(k, plan.bands, plan.rows):
                    mine = chunk >= k_lo if k_hi is None else (chunk >= k_lo) & (chunk < k_hi)
                    if alive is not None:
                        mine &= alive[start : start + len(chunk)]
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
        save_npy(self.work / "buckets" / f"pairs-{rank:05d}.npy", codes)
        return {"bands": hi - lo, "pair_codes": len(codes), "keys_held": held}
