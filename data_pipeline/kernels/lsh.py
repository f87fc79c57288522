"""The compiled inner loops of MinHash-LSH deduplication (data_pipeline.stages.dedup): band keys
of signatures, the documents whose band key repeats, and the exact Jaccard of shingle-hash
sets. Each has a numpy form with the same result, used where numba is missing and compared
bit for bit in tests/data_pipeline/test_dedup.py.

Imports: numpy and numba only, nothing else of the project but data_pipeline.kernels.simd.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.kernels.simd import HAVE_NUMBA

if HAVE_NUMBA:
    import numba

KEY_SEED = 0x243F6A8885A308D3
KEY_MUL = 0x9E3779B97F4A7C15


def band_keys_numpy(sig: np.ndarray, rows: int, bands: int) -> np.ndarray:
    """[docs, bands] uint64: one key per band; equal band values give equal keys. Keys of
    unequal values may collide (probability ~2^-64 per pair); that only adds a candidate,
    which verification rejects."""
    keys = np.empty((len(sig), bands), dtype=np.uint64)
    mul = np.uint64(KEY_MUL)
    for k in range(bands):
        h = np.full(len(sig), KEY_SEED, dtype=np.uint64)
        for j in range(k * rows, (k + 1) * rows):
            h ^= sig[:, j].astype(np.uint64)
            h *= mul
            h ^= h >> np.uint64(29)
        keys[:, k] = h
    return keys


if HAVE_NUMBA:

    @numba.njit(cache=True)
    def band_keys_kernel(sig, rows, bands, keys):
        for d in range(sig.shape[0]):
            for k in range(bands):
                h = np.uint64(KEY_SEED)
                for j in range(k * rows, (k + 1) * rows):
                    h ^= np.uint64(sig[d, j])
                    h *= np.uint64(KEY_MUL)
                    h ^= h >> np.uint64(29)
                keys[d, k] = h


def band_keys(sig: np.ndarray, rows: int, bands: int) -> np.ndarray:
    """The band keys of band_keys_numpy, in one compiled pass over the signatures (the numpy
    form walks the signature matrix column by column, 7 times per band)."""
    if not HAVE_NUMBA:
        return band_keys_numpy(sig, rows, bands)
    keys = np.empty((len(sig), bands), dtype=np.uint64)
    band_keys_kernel(np.ascontiguousarray(sig), rows, bands, keys)
    return keys


if HAVE_NUMBA:

    @numba.njit(cache=True)
    def shared_keys_kernel(keys, table, used, count):
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


def shared_keys(keys: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the keys that occur more than once."""
    if not HAVE_NUMBA:
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        return np.flatnonzero(counts[inverse] > 1)
    size = 1 << max(int(2 * len(keys)).bit_length(), 4)  # load factor <= 1/2
    table = np.empty(size, dtype=np.uint64)
    used = np.zeros(size, dtype=np.bool_)
    count = np.zeros(size, dtype=np.int32)
    return shared_keys_kernel(keys, table, used, count)


def set_jaccard_numpy(hashes: np.ndarray, offs: np.ndarray, ia, ib, out) -> None:
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
    def set_jaccard_kernel(hashes, offs, ia, ib, out):
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


def sort_each(hashes: np.ndarray, offs: np.ndarray) -> np.ndarray:
    """Each document's run of hashes sorted in place. One numpy sort per document: small
    sorts stay in cache, and one sort of (document, hash) keys over the whole chunk, or
    numba's sort, was many times slower (docs/data-dedup.md, "Measured and not kept")."""
    bounds = offs.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        hashes[lo:hi].sort()
    return hashes


def set_jaccard(hashes: np.ndarray, offs: np.ndarray, ia, ib, out) -> None:
    """out[p] = Jaccard of the shingle-hash sets of documents ia[p] and ib[p], document k being
    hashes[offs[k]:offs[k+1]] (which the compiled path sorts and deduplicates in place)."""
    if HAVE_NUMBA:
        set_jaccard_kernel(sort_each(hashes, offs), offs, ia, ib, out)
    else:
        set_jaccard_numpy(hashes, offs, ia, ib, out)
