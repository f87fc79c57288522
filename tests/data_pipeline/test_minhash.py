"""MinHash signatures must be bit-identical to datasketch's for the same shingles, scheme,
permutations and seed: datasketch 2.0 is the oracle, on real English text (the pydoc topics
that ship with CPython) and on the edge cases of word splitting and SHA-1 padding."""

from __future__ import annotations

import hashlib
import pydoc_data.topics
import struct

import numpy as np
import pytest
from datasketch import MinHash

from data_pipeline.kernels import minhash
from data_pipeline.kernels.minhash import BACKENDS, EMPTY, MinHasher, permutations

# Every character for which str.isspace() is true: Python's str.split() splits on all of them.
UNICODE_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())

EDGE_TEXTS = [
    "one",  # fewer words than n: the whole document is one shingle
    "one two three four",
    "one two three four five",  # exactly one 5-gram
    "  leading and trailing  whitespace\n\t collapses to single   spaces \r\n",
    "Ünïcödé wörds — “quoted” ☃ 漢字 テキスト are hashed as their UTF-8 bytes here",
    "words" + UNICODE_WHITESPACE + "split" + UNICODE_WHITESPACE.join("on every space char"),
    "nbsp\u00a0and\u2003em\u3000ideographic\u2028line\u205fspaces\x1cfile\x1dgroup\x1erec\x1funit",
    # Characters that share leading UTF-8 bytes with whitespace but are not whitespace:
    "U+00A9\u00a9 U+2010\u2010 U+2030\u2030 U+3001\u3001 U+1681\u1681 U+205E\u205e are words",
    # Shingles of 52..60 bytes straddle SHA-1's one-block limit (55) and of >119 take 3.
    " ".join(["abcdefghij"] * 5) + " " + " ".join(["x" * 11] * 5),
    " ".join(["w" * 30] * 12),
]


def real_texts(count: int = 120) -> list[str]:
    topics = sorted(pydoc_data.topics.topics.items())
    return [text for _, text in topics[:count]]


def datasketch_signature(text: str, scheme: str, seed: int, num_perm: int = 128, n: int = 5):
    """The oracle: datasketch's MinHash over the documented shingles (words from str.split(),
    n-grams joined by one space, UTF-8)."""
    words = text.split()
    if len(words) >= n:
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    else:
        grams = [" ".join(words)] if words else []
    m = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
    m.update_batch([g.encode("utf-8") for g in grams])
    return m.hashvalues.astype(np.uint64)


def available_backends() -> list[str]:
    """Every backend: numba is a pinned dependency and libcrypto ships with every Linux the
    project supports, so a backend that cannot run here is a failure, not a skip."""
    missing = []
    if not minhash.HAVE_NUMBA:
        missing.append("numba is not importable: simd and openssl backends")
    elif not minhash._LIBCRYPTO:
        missing.append("libcrypto's SHA1_* not found: openssl backend")
    if missing:
        pytest.fail("; ".join(missing), pytrace=False)
    return list(BACKENDS)


@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
@pytest.mark.parametrize("seed", [1, 42])
def test_permutations_are_the_ones_datasketch_draws(scheme, seed):
    a, b = permutations(128, seed, scheme)
    ref = MinHash(num_perm=128, seed=seed, scheme=scheme).permutations
    assert np.array_equal(a, np.asarray(ref[0]).astype(np.uint64))
    assert np.array_equal(b, np.asarray(ref[1]).astype(np.uint64))


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_signatures_bit_identical_to_datasketch_on_real_text(backend, scheme):
    texts = real_texts() + EDGE_TEXTS
    seed = 7
    ours = MinHasher(128, seed, 5, scheme, backend).batch(texts).signatures
    ref = np.array([datasketch_signature(t, scheme, seed) for t in texts])
    mismatched = [i for i in range(len(texts)) if not np.array_equal(ours[i], ref[i])]
    assert not mismatched, f"{len(mismatched)} documents differ, first: {texts[mismatched[0]]!r}"


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("n", [1, 3, 9])
def test_other_shingle_sizes_and_perm_counts_match_datasketch(backend, n):
    texts = real_texts(30) + EDGE_TEXTS
    ours = MinHasher(64, 3, n, "affine32", backend).batch(texts).signatures
    ref = np.array([datasketch_signature(t, "affine32", 3, num_perm=64, n=n) for t in texts])
    assert np.array_equal(ours.astype(np.uint64), ref)


@pytest.mark.parametrize("backend", available_backends())
def test_shingle_hashes_are_datasketch_sha1_hash32_in_shingle_order(backend):
    texts = real_texts(10) + EDGE_TEXTS
    batch = MinHasher(backend=backend).batch(texts)
    for i, text in enumerate(texts):
        got = batch.hashes[batch.offsets[i] : batch.offsets[i + 1]]
        want = [
            struct.unpack("<I", hashlib.sha1(s).digest()[:4])[0] for s in minhash.shingles(text, 5)
        ]
        assert got.tolist() == want


@pytest.mark.parametrize("backend", available_backends())
def test_empty_text_has_datasketchs_empty_signature(backend):
    batch = MinHasher(backend=backend).batch(["", " \n\t ", "word"])
    assert (batch.signatures[:2] == EMPTY).all()
    assert np.array_equal(batch.offsets, [0, 0, 0, 1])
    assert not (batch.signatures[2] == EMPTY).all()


def test_default_backend_is_the_fastest_available():
    expected = "simd" if minhash.HAVE_NUMBA else "numpy"
    assert MinHasher().backend == expected
    assert available_backends() == list(BACKENDS)


def test_identical_texts_give_identical_signatures_and_estimate_jaccard():
    """The estimate datasketch would give (fraction of equal slots) is what LSH verifies
    against; for texts differing in one word of ~400 it must be close to the exact value."""
    words = " ".join(real_texts(40)).split()[:400]
    a = " ".join(words)
    b = " ".join(words[:200] + ["CHANGED"] + words[201:])
    sigs = MinHasher(num_perm=128).signatures([a, a, b])
    assert np.array_equal(sigs[0], sigs[1])
    sa, sb = set(minhash.shingles(a)), set(minhash.shingles(b))
    exact = len(sa & sb) / len(sa | sb)  # 391/401 = 0.975
    est = float((sigs[0] == sigs[2]).mean())
    # 128 permutations: std of the estimate is sqrt(J(1-J)/128) = 0.014; allow 4 sigma.
    assert abs(est - exact) < 4 * np.sqrt(exact * (1 - exact) / 128)


@pytest.mark.parametrize("backend", available_backends())
def test_sha1_of_every_length_across_the_one_block_limit(backend):
    """The SIMD SHA-1 pads one block itself (messages of up to 55 bytes) and hands longer
    ones on: every length from 1 to 130 bytes, with non-ASCII bytes, in one batch so lanes
    of different lengths are hashed together."""
    words = ["\u00e9" * (length // 2) + "x" * (length % 2) for length in range(1, 131)]
    batch = MinHasher(backend=backend, ngram=1).batch(words)
    want = [struct.unpack("<I", hashlib.sha1(w.encode()).digest()[:4])[0] for w in words]
    assert batch.hashes.tolist() == want
    assert sorted({len(w.encode()) for w in words}) == list(range(1, 131))


def test_simd_hashes_long_shingles_with_hashlib_where_libcrypto_is_not_found(monkeypatch):
    """Without libcrypto, the shingles the SIMD SHA-1 leaves (over 119 bytes) go to hashlib:
    the same hashes for every length from 1 to 130 bytes, and datasketch's signatures."""
    monkeypatch.setattr(minhash, "_LIBCRYPTO", None)
    words = ["\u00e9" * (length // 2) + "x" * (length % 2) for length in range(1, 131)]
    batch = MinHasher(backend="simd", ngram=1).batch(words)
    want = [struct.unpack("<I", hashlib.sha1(w.encode()).digest()[:4])[0] for w in words]
    assert batch.hashes.tolist() == want
    ours = MinHasher(128, 7, 5, "affine32", "simd").batch(EDGE_TEXTS).signatures
    ref = np.array([datasketch_signature(t, "affine32", 7) for t in EDGE_TEXTS])
    assert np.array_equal(ours.astype(np.uint64), ref)


@pytest.mark.parametrize("backend", available_backends())
def test_batch_of_joined_documents_equals_batch_of_a_list(backend):
    """batch_joined takes documents already concatenated (the dedup workers' parsed block);
    same signatures and shingle hashes as batch() on the list."""
    texts = [t.encode() for t in real_texts(20) + EDGE_TEXTS]
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    buf = np.frombuffer(b"".join(texts) + bytes(64), dtype=np.uint8)
    hasher = MinHasher(backend=backend)
    want, got = hasher.batch(texts), hasher.batch_joined(buf, offsets)
    assert np.array_equal(got.signatures, want.signatures)
    assert np.array_equal(got.hashes, want.hashes)
    assert np.array_equal(got.offsets, want.offsets)


def test_without_numba_the_hashlib_numpy_fallback_gives_the_same_bits(tmp_path):
    """An install without numba (numba made unimportable in a fresh interpreter) signs with
    hashlib + numpy and dedups with the numpy kernels: the same signatures and shingle hashes
    as the compiled default, and the same dedup output."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from data_pipeline.stages.dedup import DedupConfig
    from data_pipeline.stages.dedup import run as dedup

    texts = real_texts(60) + EDGE_TEXTS
    docs = [{"text": t, "id": str(i)} for i, t in enumerate(texts + texts[:10])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    code = """
import json, sys
sys.modules["numba"] = None  # `import numba` raises ImportError, as where it is not installed
import numpy as np
from data_pipeline.stages import dedup
from data_pipeline.kernels import lsh, minhash
assert not minhash.HAVE_NUMBA and not lsh.HAVE_NUMBA and minhash.SHA1_IMPL == "hashlib"
texts = [json.loads(line)["text"] for line in open(sys.argv[1])]
b = minhash.MinHasher().batch(texts)
np.save(sys.argv[2], b.signatures)
np.save(sys.argv[3], b.hashes)
dedup.run(dedup.DedupConfig(input=sys.argv[1], output=sys.argv[4], progress=False))
"""
    out = [tmp_path / n for n in ("sig.npy", "hashes.npy", "fallback.jsonl")]
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "in.jsonl"), *map(str, out)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    b = MinHasher().batch(texts + texts[:10])
    assert MinHasher().backend == "simd"
    np.testing.assert_array_equal(np.load(out[0]), b.signatures)
    np.testing.assert_array_equal(np.load(out[1]), b.hashes)
    report = dedup(
        DedupConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "ours.jsonl"))
    )
    assert report["docs_removed"] >= 10  # the copies (and any near-duplicate edge texts)
    assert out[2].read_bytes() == (tmp_path / "ours.jsonl").read_bytes()
