"""Each compiled kernel of dedup's signature and cluster passes against the closest library way
of doing the same job, on the same inputs, in one run: CPU seconds per document (or per pair),
median of `--rounds`, and the ratio library / ours.

    python benchmarks/dedup_kernels.py [--docs 2000] [--rounds 7]

Issue 11's rule: a kernel that a library (orjson, hashlib, numpy) does within 10% (ratio
<= 1.10) goes. The corpus is benchmarks/dedup.py's (~3 KB English documents as JSONL). Times
are `time.process_time` of this process (one core), so other load on a shared machine slows
both sides alike; ours and the library alternate within each round. Every pair of outputs is
checked equal before anything is timed. Results and the decisions taken on them:
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from operator import methodcaller
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.dedup import make_corpus  # noqa: E402
from data_pipeline.kernels import jsonl_scan, minhash  # noqa: E402
from data_pipeline.kernels.minhash import MinHasher  # noqa: E402
from data_pipeline.stages import dedup  # noqa: E402


def cpu(fn, repeat: int) -> float:
    """CPU seconds of `repeat` calls of fn (process_time: this process only)."""
    t0 = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - t0) / repeat


def lean_orjson(block: bytes) -> tuple[list[bytes], list[bytes]]:
    """The library way to get what parse_block gives for the common line: orjson.loads, the
    three fields, the text's UTF-8, the output line by orjson.dumps. Less than io's path
    (no blank-line, type or whitespace checks), so it flatters the library."""
    texts, out = [], []
    dumps, opt = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    for line in block.splitlines():
        obj = orjson.loads(line)
        text = obj["text"]
        meta = obj.get("meta")
        texts.append(text.encode("utf-8"))
        doc = {"text": text, "id": str(obj["id"]), "meta": meta if type(meta) is dict else {}}
        out.append(dumps(doc, option=opt))
    return texts, out


def hashlib_sha1_32(grams: list[bytes]) -> np.ndarray:
    """datasketch's sha1_hash32 of each shingle with hashlib, as minhash's numpy path does."""
    digest = methodcaller("digest")
    raw = b"".join(map(digest, map(hashlib.sha1, grams)))
    return np.frombuffer(raw, np.uint8).reshape(-1, 20)[:, :4].copy().view("<u4").ravel()


def python_shingles(texts: list[bytes], n: int) -> tuple[list[bytes], list[int]]:
    """The shingles of every document with str.split and bytes.join (the job of _spans)."""
    grams, counts = [], []
    for t in texts:
        words = t.decode("utf-8").split()
        if len(words) >= n:
            g = [" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)]
        else:
            g = [" ".join(words).encode("utf-8")] if words else []
        grams += g
        counts.append(len(g))
    return grams, counts


def band_keys_numpy_wide(sig: np.ndarray, rows: int, bands: int) -> np.ndarray:
    """dedup._band_keys_numpy with the loop over rows only: every band of every document at
    once, [docs, bands] uint64 per step."""
    view = sig[:, : rows * bands].reshape(len(sig), bands, rows)
    h = np.full((len(sig), bands), dedup._KEY_SEED, dtype=np.uint64)
    mul = np.uint64(dedup._KEY_MUL)
    for j in range(rows):
        h ^= view[:, :, j]
        h *= mul
        h ^= h >> np.uint64(29)
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not minhash.HAVE_NUMBA:
        raise SystemExit("the kernels need numba")
    docs, planted = make_corpus(args.docs, 0.05)
    n = len(docs)
    lines = [json.dumps({"text": d, "id": str(i), "meta": {}}) for i, d in enumerate(docs)]
    block = ("\n".join(lines) + "\n").encode("utf-8")
    buf = np.frombuffer(block + bytes(64), dtype=np.uint8)
    size = len(block)

    # Shared inputs, computed once, untimed.
    status, _, _, text, text_off, out, out_off = jsonl_scan.parse_block(buf, size)
    assert (status == jsonl_scan.FAST).all()
    texts = [text[a:b].tobytes() for a, b in zip(text_off[:-1], text_off[1:], strict=True)]
    t_buf = np.frombuffer(b"".join([*texts, bytes(64)]), dtype=np.uint8)
    t_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=t_off[1:])
    grams, counts = python_shingles(texts, 5)
    sh_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=sh_off[1:])

    def spans():
        cap = len(t_buf) + 2
        norm = minhash._scratch("norm", len(t_buf) + 128, np.uint8)
        st, ln = minhash._scratch("starts", cap, np.int64), minhash._scratch("lens", cap, np.int64)
        got = minhash._spans(
            t_buf, t_off, 5, norm, st, ln, minhash._scratch("edges", cap, np.int64)
        )
        return got, norm, st[: got[-1]].copy(), ln[: got[-1]].copy()

    got_off, norm, starts, lens = spans()
    norm = norm.copy()
    assert np.array_equal(got_off, sh_off)
    hashes = hashlib_sha1_32(grams)
    long_i = np.flatnonzero(lens > minhash._SIMD_MAX)
    long_grams = [grams[i] for i in long_i]
    hasher = MinHasher(backend="simd")
    a, b = hasher.a, hasher.b
    a_leg, b_leg = minhash.permutations(128, 1, "legacy")
    sigs = hasher.batch_joined(t_buf, t_off).signatures
    keys = dedup._band_keys(sigs, 7, 18)
    # Pairs as the cluster task sees them: the planted duplicates and as many random pairs.
    rng = np.random.default_rng(0)
    pairs = np.array(planted + [tuple(sorted(rng.choice(n, 2, replace=False))) for _ in planted])
    sorted_hashes = dedup._sort_each(hashes.copy(), sh_off)

    def simd_sha1(tail="openssl"):
        """The default backend's SHA-1 step; `tail` hashes the shingles over 119 bytes."""
        h = np.empty(len(starts), dtype=np.uint32)
        long = np.empty(len(starts), dtype=np.int64)
        long = long[: minhash._sha1_spans_simd(norm, starts, lens, h, long)]
        if len(long):
            if tail == "openssl":
                o = np.empty(len(long), dtype=np.uint32)
                minhash._sha1_spans_openssl(*minhash._LIBCRYPTO, norm, starts[long], lens[long], o)
            else:
                o = minhash._sha1_hashlib(norm, starts[long], lens[long])  # no libcrypto
            h[long] = o
        return h

    def openssl_sha1(idx=None):
        s, ln = (starts, lens) if idx is None else (starts[idx], lens[idx])
        h = np.empty(len(s), dtype=np.uint32)
        minhash._sha1_spans_openssl(*minhash._LIBCRYPTO, norm, s, ln, h)
        return h

    def affine32_kernel():
        out = np.empty((n, 128), dtype=np.uint32)
        minhash._permute_min_affine32(hashes, sh_off, a.astype(np.uint32), b.astype(np.uint32), out)
        return out

    def permute_numpy(aa, bb, legacy):
        out = np.full((n, 128), minhash.EMPTY, dtype=np.uint32)
        for d in range(n):
            hv = hashes[sh_off[d] : sh_off[d + 1]]
            if len(hv):
                out[d] = minhash._permute_min(hv, aa, bb, legacy)
        return out

    def legacy_kernel():
        out = np.empty((n, 128), dtype=np.uint32)
        minhash._permute_min_legacy(hashes, sh_off, a_leg, b_leg, out)
        return out

    def jaccard(kind):
        res = np.empty(len(pairs))
        ia, ib = pairs[:, 0].copy(), pairs[:, 1].copy()
        if kind == "kernel":  # the kernel dedups in place: give it its own copy
            dedup._set_jaccard_kernel(sorted_hashes.copy(), sh_off, ia, ib, res)
        elif kind == "numpy":
            dedup._set_jaccard_numpy(hashes, sh_off, ia, ib, res)
        else:
            sets = {}
            for i in np.unique(pairs).tolist():
                sets[i] = set(hashes[sh_off[i] : sh_off[i + 1]].tolist())
            for p, (i, j) in enumerate(pairs.tolist()):
                x, y = sets[i], sets[j]
                res[p] = len(x & y) / len(x | y) if x or y else 1.0
        return res

    newline_buf = bytearray(block)
    line_ends = np.empty(size + 1, dtype=np.int64)
    keys_flat = keys[:, 0].copy()
    keys_dup = np.concatenate([keys_flat, keys_flat[: n // 10]])  # some shared keys

    # (kernel, library alternative, unit count, ours, library, outputs-equal check)
    cases = [
        (
            "jsonl_scan.parse_block",
            "orjson.loads + fields + orjson.dumps",
            n,
            lambda: jsonl_scan.parse_block(buf, size),
            lambda: lean_orjson(block),
            lambda o, lib: (
                lib
                == (
                    [o[3][p:q].tobytes() for p, q in zip(o[4][:-1], o[4][1:], strict=True)],
                    [o[5][p:q].tobytes() for p, q in zip(o[6][:-1], o[6][1:], strict=True)],
                )
            ),
        ),
        (
            "jsonl_scan.parse_block",
            "orjson.loads alone (a lower bound)",
            n,
            lambda: jsonl_scan.parse_block(buf, size),
            lambda: list(map(orjson.loads, block.splitlines())),
            lambda o, lib: len(lib) == n,
        ),
        (
            "jsonl_scan.count_newlines",
            "bytearray.count(b'\\n', 0, n)",
            n,
            lambda: jsonl_scan.count_newlines(newline_buf, size),
            lambda: newline_buf.count(b"\n", 0, size),
            lambda o, lib: o == lib,
        ),
        (
            "jsonl_scan.count_newlines",
            "np.count_nonzero(buf[:n] == 10)",
            n,
            lambda: jsonl_scan.count_newlines(newline_buf, size),
            lambda: int(np.count_nonzero(np.frombuffer(newline_buf, np.uint8, size) == 10)),
            lambda o, lib: o == lib,
        ),
        (
            "jsonl_scan._line_ends",
            "np.flatnonzero(buf[:n] == 10)",
            n,
            lambda: line_ends[: jsonl_scan._line_ends(buf, size, line_ends)].copy(),
            lambda: np.flatnonzero(buf[:size] == 10),
            np.array_equal,
        ),
        (
            "minhash._spans (words, shingles)",
            "str.split + bytes join per shingle",
            n,
            lambda: spans()[0],
            lambda: python_shingles(texts, 5)[1],
            lambda o, lib: np.array_equal(np.diff(o), lib),
        ),
        (
            "minhash._sha1_spans_simd (+openssl >119 B)",
            "hashlib.sha1 per shingle",
            n,
            simd_sha1,
            lambda: hashlib_sha1_32(grams),
            np.array_equal,
        ),
        (
            "minhash._sha1_spans_openssl (backend openssl)",
            "hashlib.sha1 per shingle",
            n,
            openssl_sha1,
            lambda: hashlib_sha1_32(grams),
            np.array_equal,
        ),
        (
            "minhash._sha1_spans_openssl (shingles >119 B)",
            "hashlib.sha1 per shingle",
            n,
            lambda: openssl_sha1(long_i),
            lambda: hashlib_sha1_32(long_grams),
            np.array_equal,
        ),
        (
            "minhash._sha1_spans_openssl (simd's >119 B tail)",
            "simd + hashlib.sha1 for the tail",
            n,
            simd_sha1,
            lambda: simd_sha1("hashlib"),
            np.array_equal,
        ),
        (
            "minhash._permute_min_affine32",
            "numpy broadcast a*h+b, min (per doc)",
            n,
            affine32_kernel,
            lambda: permute_numpy(a, b, False),
            np.array_equal,
        ),
        (
            "minhash._permute_min_legacy",
            "numpy uint64 a*h+b % p61, min (per doc)",
            n,
            legacy_kernel,
            lambda: permute_numpy(a_leg, b_leg, True),
            np.array_equal,
        ),
        (
            "MinHasher.batch_joined (simd, whole)",
            "MinHasher backend numpy (hashlib+numpy)",
            n,
            lambda: hasher.batch_joined(t_buf, t_off).signatures,
            lambda: MinHasher(backend="numpy").batch(texts).signatures,
            np.array_equal,
        ),
        (
            "dedup._band_keys_kernel",
            "numpy, column by column",
            n,
            lambda: dedup._band_keys(sigs, 7, 18),
            lambda: dedup._band_keys_numpy(sigs, 7, 18),
            np.array_equal,
        ),
        (
            "dedup._band_keys_kernel",
            "numpy, all bands at once",
            n,
            lambda: dedup._band_keys(sigs, 7, 18),
            lambda: band_keys_numpy_wide(sigs, 7, 18),
            np.array_equal,
        ),
        (
            "dedup._shared_keys_kernel",
            "np.unique(return_inverse, counts)",
            len(keys_dup),
            lambda: dedup._shared_keys(keys_dup),
            lambda: np.flatnonzero(
                (lambda u: u[2][u[1]])(np.unique(keys_dup, return_inverse=True, return_counts=True))
                > 1
            ),
            np.array_equal,
        ),
        (
            "dedup._set_jaccard_kernel",
            "numpy intersect1d (sorted sets)",
            len(pairs),
            lambda: jaccard("kernel"),
            lambda: jaccard("numpy"),
            np.array_equal,
        ),
        (
            "dedup._set_jaccard_kernel",
            "Python sets",
            len(pairs),
            lambda: jaccard("kernel"),
            lambda: jaccard("sets"),
            np.array_equal,
        ),
    ]
    load0 = os.getloadavg()
    print(
        f"corpus: {n} docs, {size / n / 1000:.2f} KB mean JSONL line, {len(grams)} shingles"
        f" ({len(long_grams)} > {minhash._SIMD_MAX} B), {len(pairs)} pairs; "
        f"rounds: {args.rounds}; load: {' '.join(f'{x:.2f}' for x in load0)}"
    )
    print(
        f"{'kernel':48s} {'library alternative':42s} {'ours us':>9s} {'lib us':>9s} {'lib/ours':>8s}"
    )
    for name, alt, units, ours, lib, same in cases:
        if not same(ours(), lib()):  # also the warm-up: numba loads the kernel on first call
            raise SystemExit(f"{name}: outputs differ from {alt}")
        # repeat each call so one timing spans >= ~20 ms (process_time ticks are coarse)
        rep = max(1, int(0.02 / max(cpu(ours, 1), 1e-6)))
        rep_lib = max(1, int(0.02 / max(cpu(lib, 1), 1e-6)))
        t_ours, t_lib = [], []
        for _ in range(args.rounds):
            t_ours.append(cpu(ours, rep))
            t_lib.append(cpu(lib, rep_lib))
        o, li = statistics.median(t_ours), statistics.median(t_lib)
        print(f"{name:48s} {alt:42s} {1e6 * o / units:9.3f} {1e6 * li / units:9.3f} {li / o:8.2f}")
    print(f"load now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
