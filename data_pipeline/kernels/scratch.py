"""Arrays the kernels and their callers reuse from one call to the next, per process, and the
read-only view every input buffer is handed to a kernel as.

A fresh array costs a page fault per 4 KiB the first time it is touched, per block as much
as copying the text (docs/data-dedup.md, "Measured"); a kept array is already mapped. Each
user names its arrays with its module's prefix ("minhash.norm"), so two users never share one
while both hold it.

Imports: numpy only.
"""

from __future__ import annotations

import numpy as np

_ARRAYS: dict[str, np.ndarray] = {}


def scratch(name: str, size: int, dtype: type = np.uint8) -> np.ndarray:
    """An array of at least `size` elements of `dtype` kept under `name` in this process; its
    contents are valid until the next call with the same name. A new one is 1/8 larger than
    asked (at least 64 Ki elements), so blocks of about one size do not reallocate it."""
    arr = _ARRAYS.get(name)
    if arr is None or len(arr) < size or arr.dtype != dtype:
        arr = _ARRAYS[name] = np.empty(max(size + size // 8, 1 << 16), dtype=dtype)
    return arr


def read_only(buf: np.ndarray) -> np.ndarray:
    """`buf` as a read-only array. numba compiles a kernel once per argument type, and a
    read-only array (np.frombuffer of bytes) is another type than a writable one (of a
    bytearray, or scratch): handing every input buffer over read-only compiles each kernel
    once. The JSONL parser alone is ~25 s of CPU per type, on a machine's first run."""
    if buf.flags.writeable:
        buf = buf.view()
        buf.flags.writeable = False
    return buf
