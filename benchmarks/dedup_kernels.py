"""Each compiled kernel of dedup's signature and cluster passes against the closest library way
of doing the same job, on the same inputs, in one run: CPU seconds per document (or per pair),
median of `--rounds`, and the ratio library / ours.

    python benchmarks/dedup_kernels.py [--docs 2000] [--rounds 7]

The rule: a kernel that a library (orjson, hashlib, numpy) does within 10% (ratio
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
from dataclasses import dataclass
from operator import methodcaller
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.dedup import make_corpus  # noqa: E402
from data_pipeline.kernels import jsonl_scan, lsh, minhash  # noqa: E402
from data_pipeline.kernels.minhash import MinHasher  # noqa: E402
from data_pipeline.kernels.scratch import scratch  # noqa: E402


def cpu(fn, repeat: int) -> float:
    """CPU seconds of `repeat` calls of fn (process_time: this process only)."""
    t0 = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - t0) / repeat


def lean_orjson(block: bytes) -> tuple[list[bytes], list[bytes]]:
    """The library way to get what parse_block gives for the common line: orjson.loads, the
    three fields, the text's UTF-8, the output line by orjson.dumps. Less than documents' path
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
    """lsh.band_keys_numpy with the loop over rows only: every band of every document at
    once, [docs, bands] uint64 per step."""
    view = sig[:, : rows * bands].reshape(len(sig), bands, rows)
    h = np.full((len(sig), bands), lsh.KEY_SEED, dtype=np.uint64)
    mul = np.uint64(lsh.KEY_MUL)
    for j in range(rows):
        h ^= view[:, :, j]
        h *= mul
        h ^= h >> np.uint64(29)
    return h


@dataclass
class Inputs:
    """What every case reads, computed once, untimed."""

    n: int
    block: bytes  # the corpus as JSONL
    buf: np.ndarray  # the block with 64 spare bytes
    size: int
    texts: list[bytes]
    t_buf: np.ndarray  # the texts joined, 64 spare bytes
    t_off: np.ndarray
    grams: list[bytes]
    sh_off: np.ndarray  # document d's shingles: sh_off[d]..sh_off[d + 1]
    norm: np.ndarray  # the normalised texts; shingle i is norm[starts[i]:starts[i] + lens[i]]
    starts: np.ndarray
    lens: np.ndarray
    hashes: np.ndarray  # sha1_hash32 of every shingle
    sorted_hashes: np.ndarray  # each document's hashes sorted
    hasher: MinHasher
    sigs: np.ndarray
    keys: np.ndarray  # band keys, 18 x 7
    pairs: np.ndarray  # the planted duplicates and as many random pairs


def spans(x: Inputs) -> tuple:
    """minhash._spans over the texts, with the scratch arrays MinHasher uses."""
    cap = len(x.t_buf) + 2
    norm = scratch("minhash.norm", len(x.t_buf) + 128, np.uint8)
    st, ln = scratch("minhash.starts", cap, np.int64), scratch("minhash.lens", cap, np.int64)
    edges = scratch("minhash.edges", cap, np.int64)
    norm_off = np.zeros(len(x.t_off), dtype=np.int64)
    got = minhash._spans(x.t_buf, x.t_off, 5, norm, st, ln, edges, norm_off)
    return got, norm, st[: got[-1]].copy(), ln[: got[-1]].copy()


def make_inputs(docs_n: int) -> Inputs:
    docs, planted = make_corpus(docs_n, 0.05)
    n = len(docs)
    lines = [json.dumps({"text": d, "id": str(i), "meta": {}}) for i, d in enumerate(docs)]
    block = ("\n".join(lines) + "\n").encode("utf-8")
    buf = np.frombuffer(block + bytes(64), dtype=np.uint8)
    status, _, _, text, text_off, _, _ = jsonl_scan.parse_block(buf, len(block))
    assert (status == jsonl_scan.FAST).all()
    texts = [text[a:b].tobytes() for a, b in zip(text_off[:-1], text_off[1:], strict=True)]
    t_buf = np.frombuffer(b"".join([*texts, bytes(64)]), dtype=np.uint8)
    t_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=t_off[1:])
    grams, counts = python_shingles(texts, 5)
    sh_off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=sh_off[1:])
    x = Inputs(n, block, buf, len(block), texts, t_buf, t_off, grams, sh_off, *([None] * 9))
    got_off, norm, x.starts, x.lens = spans(x)
    x.norm = norm.copy()
    assert np.array_equal(got_off, sh_off)
    x.hashes = hashlib_sha1_32(grams)
    x.hasher = MinHasher(backend="simd")
    x.sigs = x.hasher.batch_joined(t_buf, t_off).signatures
    x.keys = lsh.band_keys(x.sigs, 7, 18)
    # Pairs as the cluster task sees them: the planted duplicates and as many random pairs.
    rng = np.random.default_rng(0)
    x.pairs = np.array(planted + [tuple(sorted(rng.choice(n, 2, replace=False))) for _ in planted])
    x.sorted_hashes = lsh.sort_each(x.hashes.copy(), sh_off)
    return x


def simd_sha1(x: Inputs, tail: str = "openssl") -> np.ndarray:
    """The default backend's SHA-1 step; `tail` hashes the shingles over 119 bytes."""
    h = np.empty(len(x.starts), dtype=np.uint32)
    long = np.empty(len(x.starts), dtype=np.int64)
    long = long[: minhash._sha1_spans_simd(x.norm, x.starts, x.lens, h, long)]
    if len(long):
        if tail == "openssl":
            o = np.empty(len(long), dtype=np.uint32)
            s, ln = x.starts[long], x.lens[long]
            minhash._sha1_spans_openssl(*minhash._LIBCRYPTO, x.norm, s, ln, o)
        else:
            o = minhash._sha1_hashlib(x.norm, x.starts[long], x.lens[long])  # no libcrypto
        h[long] = o
    return h


def openssl_sha1(x: Inputs, idx=None) -> np.ndarray:
    s, ln = (x.starts, x.lens) if idx is None else (x.starts[idx], x.lens[idx])
    h = np.empty(len(s), dtype=np.uint32)
    minhash._sha1_spans_openssl(*minhash._LIBCRYPTO, x.norm, s, ln, h)
    return h


def affine32_kernel(x: Inputs) -> np.ndarray:
    out = np.empty((x.n, 128), dtype=np.uint32)
    a, b = x.hasher.a.astype(np.uint32), x.hasher.b.astype(np.uint32)
    minhash._permute_min_affine32(x.hashes, x.sh_off, a, b, out)
    return out


def permute_numpy(x: Inputs, aa, bb, legacy: bool) -> np.ndarray:
    out = np.full((x.n, 128), minhash.EMPTY, dtype=np.uint32)
    for d in range(x.n):
        hv = x.hashes[x.sh_off[d] : x.sh_off[d + 1]]
        if len(hv):
            out[d] = minhash._permute_min(hv, aa, bb, legacy)
    return out


def legacy_kernel(x: Inputs, a_leg, b_leg) -> np.ndarray:
    out = np.empty((x.n, 128), dtype=np.uint32)
    minhash._permute_min_legacy(x.hashes, x.sh_off, a_leg, b_leg, out)
    return out


def jaccard(x: Inputs, kind: str) -> np.ndarray:
    res = np.empty(len(x.pairs))
    ia, ib = x.pairs[:, 0].copy(), x.pairs[:, 1].copy()
    if kind == "kernel":  # the kernel dedups in place: give it its own copy
        lsh.set_jaccard_kernel(x.sorted_hashes.copy(), x.sh_off, ia, ib, res)
    elif kind == "numpy":
        lsh.set_jaccard_numpy(x.hashes, x.sh_off, ia, ib, res)
    else:
        sets = {}
        for i in np.unique(x.pairs).tolist():
            sets[i] = set(x.hashes[x.sh_off[i] : x.sh_off[i + 1]].tolist())
        for p, (i, j) in enumerate(x.pairs.tolist()):
            u, v = sets[i], sets[j]
            res[p] = len(u & v) / len(u | v) if u or v else 1.0
    return res


# Each case: (kernel, library alternative, unit count, ours, library, outputs-equal check).


def parse_cases(x: Inputs) -> list[tuple]:
    """The JSONL scanner's kernels."""
    n, buf, size, block = x.n, x.buf, x.size, x.block
    newline_buf = bytearray(block)
    line_ends = np.empty(size + 1, dtype=np.int64)

    def same_lines(o, lib) -> bool:
        texts = [o[3][p:q].tobytes() for p, q in zip(o[4][:-1], o[4][1:], strict=True)]
        lines = [o[5][p:q].tobytes() for p, q in zip(o[6][:-1], o[6][1:], strict=True)]
        return lib == (texts, lines)

    return [
        (
            "jsonl_scan.parse_block",
            "orjson.loads + fields + orjson.dumps",
            n,
            lambda: jsonl_scan.parse_block(buf, size),
            lambda: lean_orjson(block),
            same_lines,
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
    ]


def sha1_cases(x: Inputs) -> list[tuple]:
    """The word splitter and the SHA-1 of every shingle."""
    n, grams = x.n, x.grams
    long_i = np.flatnonzero(x.lens > minhash._SIMD_MAX)
    long_grams = [grams[i] for i in long_i]
    return [
        (
            "minhash._spans (words, shingles)",
            "str.split + bytes join per shingle",
            n,
            lambda: spans(x)[0],
            lambda: python_shingles(x.texts, 5)[1],
            lambda o, lib: np.array_equal(np.diff(o), lib),
        ),
        (
            "minhash._sha1_spans_simd (+openssl >119 B)",
            "hashlib.sha1 per shingle",
            n,
            lambda: simd_sha1(x),
            lambda: hashlib_sha1_32(grams),
            np.array_equal,
        ),
        (
            "minhash._sha1_spans_openssl (backend openssl)",
            "hashlib.sha1 per shingle",
            n,
            lambda: openssl_sha1(x),
            lambda: hashlib_sha1_32(grams),
            np.array_equal,
        ),
        (
            "minhash._sha1_spans_openssl (shingles >119 B)",
            "hashlib.sha1 per shingle",
            n,
            lambda: openssl_sha1(x, long_i),
            lambda: hashlib_sha1_32(long_grams),
            np.array_equal,
        ),
        (
            "minhash._sha1_spans_openssl (simd's >119 B tail)",
            "simd + hashlib.sha1 for the tail",
            n,
            lambda: simd_sha1(x),
            lambda: simd_sha1(x, "hashlib"),
            np.array_equal,
        ),
    ]


def permute_cases(x: Inputs) -> list[tuple]:
    """The permute-and-min kernels and the whole signature pass."""
    n, a, b = x.n, x.hasher.a, x.hasher.b
    a_leg, b_leg = minhash.permutations(128, 1, "legacy")
    return [
        (
            "minhash._permute_min_affine32",
            "numpy broadcast a*h+b, min (per doc)",
            n,
            lambda: affine32_kernel(x),
            lambda: permute_numpy(x, a, b, False),
            np.array_equal,
        ),
        (
            "minhash._permute_min_legacy",
            "numpy uint64 a*h+b % p61, min (per doc)",
            n,
            lambda: legacy_kernel(x, a_leg, b_leg),
            lambda: permute_numpy(x, a_leg, b_leg, True),
            np.array_equal,
        ),
        (
            "MinHasher.batch_joined (simd, whole)",
            "MinHasher backend numpy (hashlib+numpy)",
            n,
            lambda: x.hasher.batch_joined(x.t_buf, x.t_off).signatures,
            lambda: MinHasher(backend="numpy").batch(x.texts).signatures,
            np.array_equal,
        ),
    ]


def lsh_cases(x: Inputs) -> list[tuple]:
    """The buckets and clusters steps' kernels (data_pipeline.kernels.lsh)."""
    n, sigs = x.n, x.sigs
    keys_flat = x.keys[:, 0].copy()
    keys_dup = np.concatenate([keys_flat, keys_flat[: n // 10]])  # some shared keys

    def repeated_numpy():
        _, inverse, counts = np.unique(keys_dup, return_inverse=True, return_counts=True)
        return np.flatnonzero(counts[inverse] > 1)

    return [
        (
            "dedup._band_keys_kernel",
            "numpy, column by column",
            n,
            lambda: lsh.band_keys(sigs, 7, 18),
            lambda: lsh.band_keys_numpy(sigs, 7, 18),
            np.array_equal,
        ),
        (
            "dedup._band_keys_kernel",
            "numpy, all bands at once",
            n,
            lambda: lsh.band_keys(sigs, 7, 18),
            lambda: band_keys_numpy_wide(sigs, 7, 18),
            np.array_equal,
        ),
        (
            "dedup._shared_keys_kernel",
            "np.unique(return_inverse, counts)",
            len(keys_dup),
            lambda: lsh.shared_keys(keys_dup),
            repeated_numpy,
            np.array_equal,
        ),
        (
            "dedup._set_jaccard_kernel",
            "numpy intersect1d (sorted sets)",
            len(x.pairs),
            lambda: jaccard(x, "kernel"),
            lambda: jaccard(x, "numpy"),
            np.array_equal,
        ),
        (
            "dedup._set_jaccard_kernel",
            "Python sets",
            len(x.pairs),
            lambda: jaccard(x, "kernel"),
            lambda: jaccard(x, "sets"),
            np.array_equal,
        ),
    ]


def time_case(case: tuple, rounds: int) -> str:
    """The case's row: checked equal first (which also warms it: numba loads the kernel on
    its first call), then the median CPU time of each side over `rounds`."""
    name, alt, units, ours, lib, same = case
    if not same(ours(), lib()):
        raise SystemExit(f"{name}: outputs differ from {alt}")
    # repeat each call so one timing spans >= ~20 ms (process_time ticks are coarse)
    rep = max(1, int(0.02 / max(cpu(ours, 1), 1e-6)))
    rep_lib = max(1, int(0.02 / max(cpu(lib, 1), 1e-6)))
    t_ours, t_lib = [], []
    for _ in range(rounds):
        t_ours.append(cpu(ours, rep))
        t_lib.append(cpu(lib, rep_lib))
    o, li = statistics.median(t_ours), statistics.median(t_lib)
    return f"{name:48s} {alt:42s} {1e6 * o / units:9.3f} {1e6 * li / units:9.3f} {li / o:8.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not minhash.HAVE_NUMBA:
        raise SystemExit("the kernels need numba")
    x = make_inputs(args.docs)
    cases = [*parse_cases(x), *sha1_cases(x), *permute_cases(x), *lsh_cases(x)]
    n_long = int((x.lens > minhash._SIMD_MAX).sum())
    load0 = os.getloadavg()
    print(
        f"corpus: {x.n} docs, {x.size / x.n / 1000:.2f} KB mean JSONL line, {len(x.grams)} shingles"
        f" ({n_long} > {minhash._SIMD_MAX} B), {len(x.pairs)} pairs; "
        f"rounds: {args.rounds}; load: {' '.join(f'{v:.2f}' for v in load0)}"
    )
    print(
        f"{'kernel':48s} {'library alternative':42s} {'ours us':>9s} {'lib us':>9s} {'lib/ours':>8s}"
    )
    for case in cases:
        print(time_case(case, args.rounds))
    print(f"load now: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
