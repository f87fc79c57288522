"""MinHash signatures of word n-gram shingles, bit-identical to `datasketch.MinHash`.

The scheme, exactly (datasketch 2.0 is the oracle in tests/data_pipeline/test_minhash.py):

* Words are Python's `text.split()`: maximal runs of characters that are not Unicode whitespace
  (the characters for which `str.isspace()` is true, which include U+001C..U+001F, U+0085,
  U+00A0, U+2000..U+200A, U+2028, U+2029, U+3000). Nothing else is changed: no lower-casing,
  no punctuation stripping, so the signature is a function of the word sequence alone.
* Shingles are the word n-grams joined by one ASCII space and encoded as UTF-8:
  `" ".join(words[i:i + n]).encode("utf-8")` for i in 0..len(words)-n. A document with fewer
  than n words (but at least one) has one shingle, all its words joined; an empty one has none
  and its signature is all 0xFFFFFFFF, datasketch's empty value.
* Each shingle is hashed with datasketch's `sha1_hash32`: the first 4 bytes of SHA-1 of the
  shingle bytes, read little-endian.
* The permutations and the min follow datasketch's `scheme`:
  - `affine32` (datasketch 2.0's default): h is pre-mixed with the 32-bit MurmurHash3
    finalizer, then `a*h + b mod 2^32` with `a` odd; `a`, `b` from
    `np.random.RandomState(seed)` as datasketch draws them.
  - `legacy` (datasketch < 2.0): `((a*h + b) mod 2^64) mod (2^61 - 1)`, then the low 32 bits.
    The product really wraps at 2^64 in datasketch (numpy uint64 arithmetic), so we wrap too:
    being "bit-identical" means copying that wraparound, not the textbook formula.

The hot loop (SHA-1 of every shingle, then 128 multiply-add-min per shingle) runs in a numba
kernel when numba is installed: hashlib's Python call per shingle alone would cost more than
the whole compiled pass (`python benchmarks/dedup_kernels.py` times both). Without numba the
same arithmetic runs in hashlib + numpy and gives the same bits, only slower.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from operator import methodcaller

import numpy as np
import xxhash

from data_pipeline.kernels.choices import BACKENDS, SCHEMES
from data_pipeline.kernels.scratch import read_only, scratch
from data_pipeline.kernels.simd import HAVE_NUMBA

if HAVE_NUMBA:
    import numba

MERSENNE_61 = (1 << 61) - 1
EMPTY = 0xFFFFFFFF  # datasketch's initial (empty-set) hash value in both schemes


def normalize(text: str) -> bytes:
    """The document as its words joined by single spaces, UTF-8: every shingle is a slice of
    this byte string, so the fast kernel never needs to know about Unicode whitespace.
    Raises UnicodeEncodeError for lone surrogates (which JSON allows)."""
    return " ".join(text.split()).encode("utf-8")


def shingles(text: str, n: int = 5) -> list[bytes]:
    """The shingles of `text` as the byte strings that get hashed (see the module docstring)."""
    words = text.split()
    if not words:
        return []
    if len(words) < n:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


def permutations(num_perm: int, seed: int, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) parameters datasketch draws from `np.random.RandomState(seed)` for `scheme`,
    as uint64 arrays (the order of the draws matters: legacy interleaves a and b)."""
    gen = np.random.RandomState(seed)
    if scheme == "legacy":
        p = np.uint64(MERSENNE_61)
        ab = [
            (gen.randint(1, p, dtype=np.uint64), gen.randint(0, p, dtype=np.uint64))
            for _ in range(num_perm)
        ]
        ab = np.array(ab, dtype=np.uint64).reshape(num_perm, 2)
        return ab[:, 0].copy(), ab[:, 1].copy()
    if scheme == "affine32":
        a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
        return a.astype(np.uint64), b.astype(np.uint64)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


@dataclass
class Batch:
    """Signatures of a batch of documents and, for exact verification later, each document's
    shingle hashes in shingle order (concatenated; document i owns
    `hashes[offsets[i]:offsets[i + 1]]`; repeats are kept, callers take the set)."""

    signatures: np.ndarray  # [docs, num_perm] uint32
    hashes: np.ndarray  # uint32
    offsets: np.ndarray  # [docs + 1] int64
    # [docs, 2] uint64 when asked for (exact=True): xxh3-128 of each document's words joined by
    # single spaces (normalize()), the same bytes on every backend; else None.
    exact: np.ndarray | None = None


class MinHasher:
    """Computes datasketch-identical MinHash signatures for many documents at once."""

    def __init__(
        self,
        num_perm: int = 128,
        seed: int = 1,
        ngram: int = 5,
        scheme: str = "affine32",
        backend: str = "auto",
    ):
        """`backend="auto"` takes the fastest available of BACKENDS."""
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if ngram < 1 or num_perm < 1:
            raise ValueError("ngram and num_perm must be positive")
        if backend == "auto":
            backend = "simd" if HAVE_NUMBA else "numpy"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be auto or one of {BACKENDS}, got {backend!r}")
        if backend != "numpy" and not HAVE_NUMBA:
            raise ValueError(f"backend={backend} needs numba, which is not installed")
        if backend == "openssl" and not _LIBCRYPTO:
            raise ValueError("backend=openssl: libcrypto's SHA1_Init/Update/Final not found")
        self.num_perm, self.seed, self.ngram, self.scheme = num_perm, seed, ngram, scheme
        self.backend = backend
        self.a, self.b = permutations(num_perm, seed, scheme)

    def batch(self, texts: list[str] | list[bytes], exact: bool = False) -> Batch:
        """Signatures and shingle hashes of `texts`: str, or their UTF-8 encoding (bytes).
        The numba kernel splits words itself on the UTF-8 forms of Unicode whitespace, so the
        caller only pays for `str.encode`, not for a Python-level split and join. `exact`:
        also each document's exact_keys."""
        raw = [t.encode("utf-8") if isinstance(t, str) else t for t in texts]
        if self.backend != "numpy":
            legacy = self.scheme == "legacy"
            return _batch_numba(raw, self.ngram, self.a, self.b, legacy, self.backend, exact)
        docs = [" ".join(t.decode("utf-8").split()).encode("utf-8") for t in raw]
        out = _batch_numpy(docs, self.ngram, self.a, self.b, self.scheme == "legacy")
        if exact:
            out.exact = exact_keys(b"".join(docs), np.cumsum([0, *map(len, docs)]))
        return out

    def batch_joined(self, buf: np.ndarray, offsets: np.ndarray, exact: bool = False) -> Batch:
        """batch() of documents already joined as UTF-8: document i is
        buf[offsets[i]:offsets[i + 1]] (uint8), and buf holds at least 64 bytes after the
        last one (the numba kernels read whole 64-byte chunks)."""
        if self.backend == "numpy":
            raw = [buf[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
            return self.batch(raw, exact)
        if len(buf) < offsets[-1] + 64:
            raise ValueError("batch_joined needs 64 readable bytes after the last document")
        legacy = self.scheme == "legacy"
        raw_off = np.ascontiguousarray(offsets, dtype=np.int64)
        return _batch_buffer(buf, raw_off, self.ngram, self.a, self.b, legacy, self.backend, exact)

    def signatures(self, texts: list[str]) -> np.ndarray:
        return self.batch(texts).signatures


# --- numpy + hashlib path ------------------------------------------------------------------


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer on a uint32 array (wrapping multiplies, as datasketch)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _permute_min(hv: np.ndarray, a: np.ndarray, b: np.ndarray, legacy: bool) -> np.ndarray:
    """min over shingles of each permutation of the shingle hashes `hv` (uint32)."""
    if legacy:
        phv = hv.astype(np.uint64)[:, None] * a + b  # wraps at 2^64 exactly like datasketch
        phv %= np.uint64(MERSENNE_61)
        phv &= np.uint64(EMPTY)
        return phv.min(axis=0).astype(np.uint32)
    h = _fmix32(hv.astype(np.uint32))
    phv = h[:, None] * a.astype(np.uint32) + b.astype(np.uint32)
    return phv.min(axis=0)


def _hash32(shingles: Iterable) -> np.ndarray:
    """datasketch's sha1_hash32 of each shingle (bytes or a uint8 array) with hashlib: the
    first 4 bytes of its SHA-1 digest, read little-endian."""
    import hashlib

    raw = b"".join(map(_DIGEST, map(hashlib.sha1, shingles)))
    return np.frombuffer(raw, np.uint8).reshape(-1, 20)[:, :4].copy().view("<u4").ravel()


_DIGEST = methodcaller("digest")


def _batch_numpy(docs: list[bytes], n: int, a, b, legacy: bool) -> Batch:
    sigs = np.full((len(docs), len(a)), EMPTY, dtype=np.uint32)
    sets, offsets = [], [0]
    for i, doc in enumerate(docs):
        words = doc.split(b" ") if doc else []
        if len(words) >= n:
            grams = map(b" ".join, zip(*(words[k:] for k in range(n)), strict=False))
        else:
            grams = [doc] if doc else []
        hv = _hash32(grams)
        if len(hv):
            sigs[i] = _permute_min(hv, a, b, legacy)
        sets.append(hv)
        offsets.append(offsets[-1] + len(hv))
    hashes = np.concatenate(sets) if sets else np.zeros(0, np.uint32)
    return Batch(sigs, hashes.astype(np.uint32), np.array(offsets, dtype=np.int64))


# --- numba path ----------------------------------------------------------------------------
#
# One batch goes through three kernels: whitespace normalisation and shingle spans; SHA-1 of
# every shingle; the permute-and-min per document (vectorised across permutations, the
# minima held in vector registers).
#
# SHA-1 (backend simd, the default) runs 2 x 16 shingles at a time in LLVM vector IR for every
# shingle that fits one SHA-1 block (<= 55 bytes), 16 at a time for two blocks (<= 119 bytes):
# several times faster than libcrypto even with the CPU's SHA extensions
# (`python benchmarks/dedup_kernels.py` times simd, openssl and hashlib on the same shingles).
# Longer shingles, and backend openssl, use OpenSSL's libcrypto, the library CPython's own
# hashlib is linked to, called from compiled code through its low-level SHA1_Init/Update/Final
# entry points: the one-shot EVP path pays a context allocation per call in OpenSSL 3 and
# hashlib adds Python overhead on top, while SHA1_Update uses the CPU's SHA extensions where
# present. Where libcrypto cannot be found, hashlib hashes the long shingles: as fast as a
# portable compiled SHA-1 on them (docs/benchmarks.md), and they are few in English prose (the
# same script prints how many shingles are over 119 bytes: 678 of 945,943 in its corpus).
# The functions are called through their addresses (an intrinsic below), which keeps every
# kernel cacheable on disk: compilation is paid once per machine, not once per process.


def _find_libcrypto() -> tuple[int, int, int] | None:
    """Addresses of SHA1_Init/Update/Final in the libcrypto that hashlib uses, or None."""
    import ctypes

    try:
        import _hashlib  # noqa: F401  (maps libcrypto into this process)

        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "libcrypto" in ln and "/" in ln})
        if not paths:
            return None
        lib = ctypes.CDLL(paths[0])
        fns = (lib.SHA1_Init, lib.SHA1_Update, lib.SHA1_Final)
    except (ImportError, OSError, AttributeError):
        return None
    return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in fns)


_LIBCRYPTO = _find_libcrypto() if HAVE_NUMBA else None
# What the default backend hashes with: SIMD for one-block shingles, then the next best
SHA1_IMPL = ("simd+openssl" if _LIBCRYPTO else "simd+hashlib") if HAVE_NUMBA else "hashlib"


def _sha1_hashlib(norm: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """sha1_hash32 of the shingles norm[starts[i]:starts[i]+lens[i]] with hashlib."""
    spans = zip(starts.tolist(), lens.tolist(), strict=True)
    return _hash32(norm[s : s + n] for s, n in spans)


def exact_keys(norm, norm_off: np.ndarray) -> np.ndarray:
    """[docs, 2] uint64: xxh3-128 of each document's normalised bytes
    norm[norm_off[i]:norm_off[i + 1]]. 128 bits, because at 10^9 documents a 64-bit key would
    merge two different texts with probability ~3% (n^2 / 2^65)."""
    view = memoryview(norm).cast("B")
    cuts = np.asarray(norm_off).tolist()
    digest = xxhash.xxh3_128_digest
    raw = b"".join([digest(view[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)])
    return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2)


def _batch_numba(
    raw: list[bytes], n: int, a, b, legacy: bool, sha1: str, exact: bool = False
) -> Batch:
    # 64 bytes of padding: _spans reads whole 64-byte chunks (and masks what lies past a doc)
    buf = np.frombuffer(b"".join([*raw, bytes(64)]), dtype=np.uint8)
    raw_off = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in raw], out=raw_off[1:])
    return _batch_buffer(buf, raw_off, n, a, b, legacy, sha1, exact)


def _batch_buffer(
    buf: np.ndarray, raw_off: np.ndarray, n: int, a, b, legacy: bool, sha1: str, exact: bool
) -> Batch:
    """The numba path over documents buf[raw_off[i]:raw_off[i+1]] (64 readable bytes after
    the last)."""
    cap = len(buf) + 2
    # spare bytes: the SIMD SHA-1 reads up to 128 bytes from a shingle start (and masks)
    norm = scratch("minhash.norm", len(buf) + 128, np.uint8)
    starts, lens = scratch("minhash.starts", cap, np.int64), scratch("minhash.lens", cap, np.int64)
    norm_off = np.zeros(len(raw_off), dtype=np.int64)
    edges = scratch("minhash.edges", cap, np.int64)
    sh_off = _spans(read_only(buf), raw_off, n, norm, starts, lens, edges, norm_off)
    keys = exact_keys(norm, norm_off) if exact else None
    starts, lens = starts[: sh_off[-1]], lens[: sh_off[-1]]
    hashes = np.empty(len(starts), dtype=np.uint32)
    if sha1 == "simd":
        long = scratch(
            "minhash.long", len(starts), np.int64
        )  # shingles > 119 bytes, left to the next
        long = long[: _sha1_spans_simd(norm, starts, lens, hashes, long)]
        if len(long):
            if _LIBCRYPTO:
                out = np.empty(len(long), dtype=np.uint32)
                _sha1_spans_openssl(*_LIBCRYPTO, norm, starts[long], lens[long], out)
            else:
                out = _sha1_hashlib(norm, starts[long], lens[long])
            hashes[long] = out
    else:
        _sha1_spans_openssl(*_LIBCRYPTO, norm, starts, lens, hashes)
    sigs = np.empty((len(raw_off) - 1, len(a)), dtype=np.uint32)
    if legacy:
        _permute_min_legacy(hashes, sh_off, a, b, sigs)
    else:
        width = -(-len(a) // 16) * 16  # the kernel works on whole vectors of 16 permutations
        a32, b32 = np.zeros(width, np.uint32), np.zeros(width, np.uint32)
        a32[: len(a)], b32[: len(b)] = a, b
        if width != len(a):
            wide = np.empty((len(raw_off) - 1, width), dtype=np.uint32)
            _permute_min_affine32(hashes, sh_off, a32, b32, wide)
            sigs[:] = wide[:, : len(a)]
        else:
            _permute_min_affine32(hashes, sh_off, a32, b32, sigs)
    return Batch(sigs, hashes, sh_off, keys)


if HAVE_NUMBA:
    _U = np.uint32
    _M32 = np.uint64(0xFFFFFFFF)
    _ix = np.uint64  # an index known to be >= 0 (see _spans)

    @numba.njit(cache=True, inline="always")
    def _ws_len(buf, q, hi):
        """Byte length of the Unicode whitespace character (str.isspace) at buf[q], else 0.
        The input is valid UTF-8 (it came from str.encode)."""
        c = buf[q]
        if (9 <= c <= 13) or (28 <= c <= 32):
            return 1
        if c == 0xC2 and q + 1 < hi:
            c1 = buf[q + 1]
            return 2 if (c1 == 0x85 or c1 == 0xA0) else 0
        if c == 0xE1 and q + 2 < hi:
            return 3 if (buf[q + 1] == 0x9A and buf[q + 2] == 0x80) else 0
        if c == 0xE2 and q + 2 < hi:
            c1, c2 = buf[q + 1], buf[q + 2]
            if c1 == 0x80 and (c2 <= 0x8A or c2 == 0xA8 or c2 == 0xA9 or c2 == 0xAF):
                return 3  # U+2000..U+200A (c2 >= 0x80 always: continuation byte), U+2028/9/2F
            if c1 == 0x81 and c2 == 0x9F:
                return 3  # U+205F
            return 0
        if c == 0xE3 and q + 2 < hi:
            return 3 if (buf[q + 1] == 0x80 and buf[q + 2] == 0x80) else 0
        return 0

    # Words are found 64 bytes at a time: one vector compare gives a 64-bit mask of the ASCII
    # whitespace bytes, the edges of its runs are the word boundaries, and trailing-zero
    # counts walk them (a byte-at-a-time loop mispredicts a branch at nearly every word
    # boundary; `python benchmarks/dedup_kernels.py` times the two on the same documents).
    from llvmlite import ir as _ir
    from numba.cpython.unsafe.numbers import trailing_zeros as _tz
    from numba.extending import intrinsic as _intrinsic

    from data_pipeline.kernels.simd import ws_lead_mask64, ws_mask64

    _ONE = np.uint64(1)

    @numba.njit(cache=True, boundscheck=False)
    def _spans(buf, raw_off, n, norm, starts, lens, edges, norm_off):
        """Document d is buf[raw_off[d]:raw_off[d+1]] (valid UTF-8; buf holds 64 readable
        bytes past the last document). Copy each document's words joined by single spaces
        (as `" ".join(text.split())` would) into `norm` and list every shingle as (start,
        length) in `norm`; document d owns shingles sh_off[d]..sh_off[d+1] (returned) and
        norm[norm_off[d]:norm_off[d+1]] (norm_off: ndocs + 1 zeros, filled here).
        Runs of words already separated by single spaces are copied whole. Hot indices go
        through _ix (unsigned), so numba drops its negative-index check. `norm` holds
        >= len(buf) bytes; `starts`, `lens` and `edges` >= len(buf) + 2 entries."""
        ndocs = len(raw_off) - 1
        sh_off = np.zeros(ndocs + 1, dtype=np.int64)
        base = buf.ctypes.data
        o = 0
        j = 0
        for d in range(ndocs):
            lo, hi = raw_off[d], raw_off[d + 1]
            # 1. word edges: starts at even, ends (exclusive) at odd indices of `edges`
            ne = 0
            prev = _ONE  # the byte before the document counts as whitespace
            carry = np.uint64(0)  # whitespace bits of a character reaching into this chunk
            p = lo
            while p < hi:
                m = ws_mask64(base + p) | carry
                carry = np.uint64(0)
                lead = ws_lead_mask64(base + p)
                if hi - p < 64:  # bytes past the document count as whitespace
                    past = ~((_ONE << np.uint64(hi - p)) - _ONE)
                    lead &= ~past
                    m |= past
                while lead:  # rare in most text: 0xC2 also leads U+0080..U+00BF
                    t = np.int64(_tz(lead))
                    lead &= lead - _ONE
                    c = _ws_len(buf, p + t, hi)
                    if c:
                        bits = (_ONE << np.uint64(c)) - _ONE
                        m |= bits << np.uint64(t)
                        if t + c > 64:
                            carry = bits >> np.uint64(64 - t)
                e = m ^ ((m << _ONE) | prev)
                while e:
                    edges[_ix(ne)] = p + np.int64(_tz(e))
                    ne += 1
                    e &= e - _ONE
                prev = m >> np.uint64(63)
                p += 64
            if ne & 1:  # the last word runs to the end of the document
                edges[_ix(ne)] = hi
                ne += 1
            nw = ne >> 1
            if nw == 0:
                sh_off[d + 1] = j
                norm_off[d + 1] = o
                continue
            # 2. the normalised copy; edges[2w] becomes word w's start in norm
            r = edges[0]  # start in buf of the current run of single-space-separated words
            ro = o  # and in norm
            for w in range(1, nw):
                a = edges[_ix(2 * w)]
                z = edges[_ix(2 * w - 1)]
                if a - z != 1 or buf[_ix(z)] != 32:
                    ln = z - r
                    for q in range(ln):
                        norm[_ix(ro + q)] = buf[_ix(r + q)]
                    norm[_ix(ro + ln)] = 32
                    r = a
                    ro = ro + ln + 1
                edges[_ix(2 * w)] = ro + (a - r)
            edges[0] = o
            ln = edges[_ix(2 * nw - 1)] - r
            for q in range(ln):
                norm[_ix(ro + q)] = buf[_ix(r + q)]
            o = ro + ln
            edges[_ix(2 * nw)] = o + 1  # a virtual next word: a shingle ends before its space
            # 3. shingles: n consecutive words; fewer than n words make one shingle
            for i in range(min(n, nw) - 1, nw):
                s = edges[_ix(2 * (i - n + 1))] if i >= n - 1 else edges[0]
                starts[_ix(j)] = s
                lens[_ix(j)] = edges[_ix(2 * i + 2)] - 1 - s
                j += 1
            sh_off[d + 1] = j
            norm_off[d + 1] = o
        return sh_off

    # Intrinsics calling a C function given by its address (an integer argument rather than
    # a ctypes global, so the kernels that use them can be cached on disk; the address is
    # looked up again in every process). Each returns the C function's int.
    _I8P = _ir.IntType(8).as_pointer()
    _I32 = _ir.IntType(32)
    _I64 = _ir.IntType(64)

    def _fn(builder, addr, arg_types):
        return builder.inttoptr(addr, _ir.FunctionType(_I32, arg_types).as_pointer())

    @_intrinsic
    def _call_p(typingctx, addr, p):  # SHA1_Init(ctx)
        def codegen(context, builder, sig, args):
            fn = _fn(builder, args[0], [_I8P])
            return builder.call(fn, [builder.inttoptr(args[1], _I8P)])

        return numba.types.int32(numba.types.intp, numba.types.intp), codegen

    @_intrinsic
    def _call_pp(typingctx, addr, p, q):  # SHA1_Final(md, ctx)
        def codegen(context, builder, sig, args):
            fn = _fn(builder, args[0], [_I8P, _I8P])
            ptrs = [builder.inttoptr(args[1], _I8P), builder.inttoptr(args[2], _I8P)]
            return builder.call(fn, ptrs)

        return numba.types.int32(numba.types.intp, numba.types.intp, numba.types.intp), codegen

    @_intrinsic
    def _call_ppn(typingctx, addr, p, q, n):  # SHA1_Update(ctx, data, len)
        def codegen(context, builder, sig, args):
            fn = _fn(builder, args[0], [_I8P, _I8P, _I64])
            ptrs = [builder.inttoptr(args[1], _I8P), builder.inttoptr(args[2], _I8P)]
            return builder.call(fn, [*ptrs, args[3]])

        intp = numba.types.intp
        return numba.types.int32(intp, intp, intp, intp), codegen

    _SIMD_MAX = 119  # the longest message that fits two SHA-1 blocks with its padding
    _V16 = _ir.VectorType(_I32, 16)

    def _sha1_x16(nblocks: int, nsets: int):
        """An intrinsic computing SHA-1 of 16 * nsets messages of at most 64 * nblocks - 9
        bytes (exactly nblocks blocks long with their padding), each lane of a 16 x uint32
        vector holding one message (LLVM maps the vectors to AVX-512, AVX2 or SSE, as the CPU
        has). Message i is the bytes at base + offs[i] (int64), lens[i] (int32) long; out[i]
        (uint32) gets datasketch's sha1_hash32 of it: the first 4 digest bytes, read
        little-endian. 64 * nblocks bytes are read from each message start; those past
        its end are masked off and replaced by the padding (0x80, zeros, the length in
        bits). The rounds of a SHA-1 are one long dependency chain: nsets independent sets
        of 16 messages, interleaved round by round, keep the vector units busy meanwhile."""

        @_intrinsic
        def sha1_x16(typingctx, base, offs, lens, out):
            def codegen(context, builder, sig, args):
                b = builder
                base = b.inttoptr(args[0], _I8P)
                offs = b.inttoptr(args[1], _I64.as_pointer())
                lens_p = b.inttoptr(args[2], _V16.as_pointer())
                out = b.inttoptr(args[3], _V16.as_pointer())

                def k(c):
                    return _ir.Constant(_V16, [c & 0xFFFFFFFF] * 16)

                def rotl(x, r):
                    return b.or_(b.shl(x, k(r)), b.lshr(x, k(32 - r)))

                def bswap(x):
                    hi = b.or_(b.lshr(x, k(24)), b.and_(b.lshr(x, k(8)), k(0xFF00)))
                    lo = b.or_(b.and_(b.shl(x, k(8)), k(0xFF0000)), b.shl(x, k(24)))
                    return b.or_(hi, lo)

                def message_words(st):
                    lens = b.load(b.gep(lens_p, [_ir.Constant(_I64, st)]), align=4)
                    msgs = []
                    for i in range(16):
                        at = b.load(b.gep(offs, [_ir.Constant(_I64, 16 * st + i)]))
                        msgs.append(b.gep(base, [at]))
                    # Load 64 bytes of each message as a row, then transpose the 16 x 16
                    # words (4 butterfly steps of two-source shuffles, 64 in all) so that
                    # vector t holds word t of every message: cheaper than 224 single-word
                    # loads and inserts (docs/data-dedup.md, "Measured").
                    columns = []
                    for blk in range(nblocks):
                        rows = []
                        for i in range(16):
                            p = b.gep(msgs[i], [_ir.Constant(_I64, 64 * blk)])
                            rows.append(b.load(b.bitcast(p, _V16.as_pointer()), align=1))
                        for h in (8, 4, 2, 1):
                            low = [c if not c & h else 16 + c - h for c in range(16)]
                            high = [c + h if not c & h else 16 + c for c in range(16)]
                            for r in range(16):
                                if r & h:
                                    continue
                                x, y = rows[r], rows[r + h]
                                rows[r] = b.shuffle_vector(x, y, _ir.Constant(_V16, low))
                                rows[r + h] = b.shuffle_vector(x, y, _ir.Constant(_V16, high))
                        columns += rows
                    words = []
                    for t in range(16 * nblocks - 2):  # message bytes, then 0x80, then zeros
                        x = bswap(columns[t])  # SHA-1 reads big-endian words
                        rem = b.sub(lens, k(4 * t))  # message bytes left from this word on
                        whole = b.icmp_signed(">=", rem, k(4))
                        past = b.icmp_signed("<", rem, k(0))
                        bits = b.mul(b.select(whole, k(0), b.select(past, k(0), rem)), k(8))
                        keep = b.xor(b.lshr(k(0xFFFFFFFF), bits), k(0xFFFFFFFF))
                        last = b.or_(b.and_(x, keep), b.lshr(k(0x80000000), bits))
                        words.append(b.select(whole, x, b.select(past, k(0), last)))
                    return words + [k(0), b.mul(lens, k(8))]  # the length in bits

                words = [message_words(st) for st in range(nsets)]
                init = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0)
                state = [[k(h) for h in init] for _ in range(nsets)]
                for blk in range(nblocks):
                    w = [ws[16 * blk : 16 * blk + 16] for ws in words]
                    v = [list(sv) for sv in state]  # a, b, c, d, e of each set
                    for t in range(80):
                        for st in range(nsets):
                            ws, (va, vb, vc, vd, ve) = w[st], v[st]
                            if t >= 16:
                                x = b.xor(ws[(t - 3) & 15], ws[(t - 8) & 15])
                                x = b.xor(b.xor(x, ws[(t - 14) & 15]), ws[t & 15])
                                ws[t & 15] = rotl(x, 1)
                            if t < 20:
                                f, kt = b.xor(vd, b.and_(vb, b.xor(vc, vd))), 0x5A827999
                            elif t < 40:
                                f, kt = b.xor(b.xor(vb, vc), vd), 0x6ED9EBA1
                            elif t < 60:
                                f = b.or_(b.and_(vb, vc), b.and_(vd, b.or_(vb, vc)))
                                kt = 0x8F1BBCDC
                            else:
                                f, kt = b.xor(b.xor(vb, vc), vd), 0xCA62C1D6
                            tmp = b.add(b.add(rotl(va, 5), f), b.add(b.add(ve, k(kt)), ws[t & 15]))
                            v[st] = [tmp, va, rotl(vb, 30), vc, vd]
                    state = [
                        [b.add(x, y) for x, y in zip(sv, vv, strict=True)]
                        for sv, vv in zip(state, v, strict=True)
                    ]
                for st in range(nsets):
                    at = b.gep(out, [_ir.Constant(_I64, st)])
                    b.store(bswap(state[st][0]), at, align=4)
                return context.get_dummy_value()

            intp = numba.types.intp
            return numba.types.none(intp, intp, intp, intp), codegen

        return sha1_x16

    _SETS = 2  # sets of 16 one-block messages hashed together
    _sha1_x16_1 = _sha1_x16(1, _SETS)  # messages of up to 55 bytes
    _sha1_x16_2 = _sha1_x16(2, 1)  # messages of 56..119 bytes (3% of 5-grams)

    @numba.njit(cache=True, inline="always")
    def _sha1_flush(blocks, m, base, offs, ln, lane, h, out):
        """Hash the m messages queued in offs/ln (idle lanes repeat the first one) and
        store each hash at out[lane[j]]."""
        for j in range(m, len(offs)):
            offs[j], ln[j] = offs[0], ln[0]
        if blocks == 1:
            _sha1_x16_1(base, offs.ctypes.data, ln.ctypes.data, h.ctypes.data)
        else:
            _sha1_x16_2(base, offs.ctypes.data, ln.ctypes.data, h.ctypes.data)
        for j in range(m):
            out[lane[j]] = h[j]

    @numba.njit(cache=True)
    def _sha1_spans_simd(norm, starts, lens, out, long):
        """out[i] = datasketch's sha1_hash32(norm[starts[i]:starts[i]+lens[i]]) for every
        shingle of at most 119 bytes, one- and two-block messages in separate queues;
        longer ones are left to the caller: their indices go to `long`, their number is
        returned. `norm` must hold 128 bytes after the last start."""
        width = 16 * _SETS
        offs1, offs2 = np.zeros(width, dtype=np.int64), np.zeros(16, dtype=np.int64)
        ln1, ln2 = np.zeros(width, dtype=np.int32), np.zeros(16, dtype=np.int32)
        lane1, lane2 = np.zeros(width, dtype=np.int64), np.zeros(16, dtype=np.int64)
        h = np.zeros(width, dtype=np.uint32)
        base = norm.ctypes.data
        m1 = m2 = nlong = 0
        for i in range(len(starts)):
            n = lens[i]
            if n > _SIMD_MAX:
                long[nlong] = i
                nlong += 1
            elif n <= 55:
                offs1[m1], ln1[m1], lane1[m1] = starts[i], n, i
                m1 += 1
                if m1 == width:
                    _sha1_flush(1, m1, base, offs1, ln1, lane1, h, out)
                    m1 = 0
            else:
                offs2[m2], ln2[m2], lane2[m2] = starts[i], n, i
                m2 += 1
                if m2 == 16:
                    _sha1_flush(2, m2, base, offs2, ln2, lane2, h, out)
                    m2 = 0
        if m1:
            _sha1_flush(1, m1, base, offs1, ln1, lane1, h, out)
        if m2:
            _sha1_flush(2, m2, base, offs2, ln2, lane2, h, out)
        return nlong

    @numba.njit(cache=True)
    def _sha1_spans_openssl(init, update, final, norm, starts, lens, out):
        """out[i] = datasketch's sha1_hash32(norm[starts[i]:starts[i]+lens[i]]), with
        libcrypto's SHA1_Init/Update/Final at the given addresses."""
        ctx = np.zeros(32, dtype=np.uint32)  # SHA_CTX is 96 bytes
        md = np.zeros(20, dtype=np.uint8)
        base = norm.ctypes.data
        for i in range(len(starts)):
            _call_p(init, ctx.ctypes.data)
            _call_ppn(update, ctx.ctypes.data, base + starts[i], lens[i])
            _call_pp(final, md.ctypes.data, ctx.ctypes.data)
            out[i] = (
                _U(md[0]) | (_U(md[1]) << _U(8)) | (_U(md[2]) << _U(16)) | (_U(md[3]) << _U(24))
            )

    def _affine32_x16(nvec: int):
        """An intrinsic: the affine32 MinHash of one document over 16 * nvec permutations,
        with the running minima held in nvec vector registers across the whole document
        (the loop numba generated stored and reloaded all 128 minima for every shingle).
        Arguments: address of the document's `count` uint32 shingle hashes, count, addresses
        of a and b (16 * nvec uint32 each), of the output (16 * nvec uint32)."""

        @_intrinsic
        def affine32(typingctx, hashes, count, a, b, out):
            def codegen(context, builder, sig, args):
                from numba.core import cgutils

                bld = builder
                i32 = _I32
                vt = _V16
                vp = vt.as_pointer()

                def splat(c):
                    return _ir.Constant(vt, [c] * 16)

                def const(c):
                    return _ir.Constant(i32, c)

                hp = bld.inttoptr(args[0], i32.as_pointer())
                ap, bp = bld.inttoptr(args[2], vp), bld.inttoptr(args[3], vp)
                av = [bld.load(bld.gep(ap, [_ir.Constant(_I64, k)]), align=4) for k in range(nvec)]
                bv = [bld.load(bld.gep(bp, [_ir.Constant(_I64, k)]), align=4) for k in range(nvec)]
                acc = [cgutils.alloca_once_value(bld, splat(0xFFFFFFFF)) for _ in range(nvec)]
                with cgutils.for_range(bld, args[1]) as loop:
                    h = bld.load(bld.gep(hp, [loop.index]), align=4)
                    # datasketch affine32 pre-mixes the hash with MurmurHash3's fmix32
                    h = bld.xor(h, bld.lshr(h, const(16)))
                    h = bld.mul(h, const(0x85EBCA6B))
                    h = bld.xor(h, bld.lshr(h, const(13)))
                    h = bld.mul(h, const(0xC2B2AE35))
                    h = bld.xor(h, bld.lshr(h, const(16)))
                    hv = bld.insert_element(_ir.Constant(vt, _ir.Undefined), h, const(0))
                    hv = bld.shuffle_vector(hv, hv, _ir.Constant(vt, [0] * 16))
                    for k in range(nvec):
                        v = bld.add(bld.mul(av[k], hv), bv[k])  # wraps mod 2^32
                        cur = bld.load(acc[k])
                        bld.store(bld.select(bld.icmp_unsigned("<", v, cur), v, cur), acc[k])
                op = bld.inttoptr(args[4], vp)
                for k in range(nvec):
                    bld.store(bld.load(acc[k]), bld.gep(op, [_ir.Constant(_I64, k)]), align=4)
                return context.get_dummy_value()

            intp = numba.types.intp
            return numba.types.none(intp, intp, intp, intp, intp), codegen

        return affine32

    _affine32_x128 = _affine32_x16(8)
    _affine32_x16_1 = _affine32_x16(1)

    @numba.njit(cache=True)
    def _permute_min_affine32(hashes, sh_off, a, b, sigs):
        """datasketch affine32: fmix32 pre-mix, then min over shingles of a*h + b mod 2^32.
        a, b and each row of sigs hold a multiple of 16 permutations; 128 at a time, then
        16 at a time."""
        num_perm = len(a)
        hp = hashes.ctypes.data
        for d in range(len(sh_off) - 1):
            lo, n = sh_off[d], sh_off[d + 1] - sh_off[d]
            p = 0
            while p < num_perm:
                at = hp + 4 * lo
                args = (a.ctypes.data + 4 * p, b.ctypes.data + 4 * p, sigs[d].ctypes.data + 4 * p)
                if num_perm - p >= 128:
                    _affine32_x128(at, n, *args)
                    p += 128
                else:
                    _affine32_x16_1(at, n, *args)
                    p += 16

    @numba.njit(cache=True)
    def _permute_min_legacy(hashes, sh_off, a, b, sigs):
        """datasketch legacy: ((a*h + b) mod 2^64) mod (2^61 - 1), low 32 bits, min."""
        num_perm = len(a)
        p61 = np.uint64(MERSENNE_61)
        sig = np.empty(num_perm, dtype=np.uint64)
        for d in range(len(sh_off) - 1):
            sig[:] = _M32
            for i in range(sh_off[d], sh_off[d + 1]):
                h = np.uint64(hashes[i])
                for p in range(num_perm):
                    v = ((a[p] * h + b[p]) % p61) & _M32
                    sig[p] = min(sig[p], v)
            for p in range(num_perm):
                sigs[d, p] = _U(sig[p])
