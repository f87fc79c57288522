"""The clusters step: candidate pairs verified on their exact shingle sets (after a prefilter
on the MinHash estimate), union-find over the verified pairs, and the first document of each
cluster in input order kept."""

from __future__ import annotations

import numpy as np

from data_pipeline.kernels.lsh import set_jaccard
from data_pipeline.runtime import scaleout
from data_pipeline.stages.dedup.config import DedupConfig
from data_pipeline.stages.dedup.corpus import Corpus, save_npy


def _exact_jaccard(parts: Corpus, pairs: np.ndarray, progress) -> np.ndarray:
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
        set_jaccard(hashes, offs, ia, ib, res)
        progress.update(len(chunk))
    return out


def _estimated_jaccard(corpus: Corpus, pairs: np.ndarray) -> np.ndarray:
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


def _clusters(
    cfg: DedupConfig, corpus: Corpus, pairs: np.ndarray
) -> tuple[np.ndarray, dict, np.ndarray]:
    """Verify each candidate pair, union-find over verified pairs; (keep mask, statistics,
    [m, 2] (removed document, the first of its cluster, which is kept))."""
    n_docs = corpus.n_docs
    est = _estimated_jaccard(corpus, pairs) if len(pairs) else np.zeros(0)
    sim = est.copy()
    checked = np.zeros(len(pairs), dtype=bool)
    if cfg.verify == "exact":
        todo = np.flatnonzero(est >= cfg.threshold - cfg.prefilter_margin)
        with scaleout.progress(cfg, "dedup verify", len(todo), "pair") as bar:
            sim[todo] = _exact_jaccard(corpus, pairs[todo], bar)
        checked[todo] = True
    else:  # "signature" (DEDUP_LIMITS allows no other): the estimate decides
        checked[:] = True
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
    removed, roots = [], []
    for x in parent:
        r = find(x)
        sizes[r] = sizes.get(r, 1) + 1
        removed.append(x)
        roots.append(r)
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

    info = {
        "candidate_pairs": len(pairs),
        "prefiltered_pairs": int((~checked).sum()),
        "verified_pairs": int(verified.sum()),
        "clusters": len(sizes),
        "largest_cluster": max(sizes.values(), default=1),
        "docs_removed": len(removed),
        "examples": [pair_info(t) for t in picks],
        "closest_rejected": [pair_info(t) for t in near],
    }
    return keep, info, np.array([removed, roots], dtype=np.int64).T.reshape(-1, 2)


class DedupClusters(scaleout.TaskStep):
    """One task over the candidate pairs only: prefilter by estimated Jaccard, exact Jaccard,
    union-find, keep the first document of each cluster in input order."""

    name = "clusters"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        corpus = Corpus(plan)
        n = max(corpus.n_docs, 1)
        groups = [
            np.load(self.work / "buckets" / f"pairs-{t:05d}.npy") for t in range(plan.bucket_tasks)
        ]
        codes = np.unique(np.concatenate(groups)) if groups else np.zeros(0, np.int64)
        pairs = np.stack([codes // n, codes % n], axis=1)
        exact = corpus.exact_removed(self.work, plan.step_counts()["exact"])
        try:
            keep, info, near = _clusters(self.cfg, corpus, pairs)
        finally:
            corpus.close()
        keep[exact[:, 0]] = False
        save_npy(self.work / "clusters" / "keep.npy", keep)
        save_npy(self.work / "clusters" / "removed.npy", removals(exact, near))
        return {**info, "exact_duplicates": len(exact), "near_duplicates": len(near)}


EXACT, NEAR = 0, 1  # the kind column of clusters/removed.npy


def removals(exact: np.ndarray, near: np.ndarray) -> np.ndarray:
    """[m, 3] int64 rows (removed document, its kept copy, EXACT or NEAR) by document. An
    exact duplicate's kept copy is its canonical copy's, which a near-duplicate cluster may
    have removed in turn (then the first of that cluster)."""
    near = near[np.argsort(near[:, 0], kind="stable")]
    canon = exact[:, 1]
    pos = np.minimum(np.searchsorted(near[:, 0], canon), max(len(near) - 1, 0))
    hit = (near[pos, 0] == canon) if len(near) else np.zeros(len(canon), dtype=bool)
    kept = np.where(hit, near[pos, 1] if len(near) else canon, canon)
    rows = np.concatenate(
        [
            np.stack([exact[:, 0], kept, np.full(len(exact), EXACT)], axis=1),
            np.stack([near[:, 0], near[:, 1], np.full(len(near), NEAR)], axis=1),
        ]
    ).astype(np.int64)
    return rows[np.argsort(rows[:, 0], kind="stable")]
