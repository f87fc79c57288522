"""Compiled inner loops (numba): `simd` (whether numba is here; 64-byte mask intrinsics shared by
the others), `scratch` (arrays reused between calls), `minhash` (datasketch-identical MinHash
signatures, SIMD SHA-1), `jsonl_scan` (the common JSONL document line parsed in one pass) and
`lsh` (dedup's band keys, repeated keys and exact set Jaccard); `choices` names what a config
may pick among (schemes, backends) without importing numba.

Imports: numpy and numba only, nothing else of the project (`choices`: nothing at all).
"""
