"""The kernels' names a stage's config may choose among, importable without numba: a config is
built (and checked) on every run of the chain, also when a complete step is skipped, as at the
start of every training rank on the embedded tiny corpus, where importing numba would cost
~0.3 s of CPU per rank for nothing."""

from __future__ import annotations

# datasketch's permutation schemes (data_pipeline.kernels.minhash describes both).
SCHEMES = ("affine32", "legacy")
# Signature backends, fastest first; all give the same bits. "simd": numba kernels with a
# 16-lane SIMD SHA-1 for shingles of up to 119 bytes (one or two SHA-1 blocks; 99.9% of word
# 5-grams of English) and libcrypto's SHA-1 (or, where it is not found, hashlib) for longer
# ones; "openssl": numba kernels with libcrypto's SHA-1; "numpy": hashlib + numpy.
BACKENDS = ("simd", "openssl", "numpy")
