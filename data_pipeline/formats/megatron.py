"""Megatron's indexed dataset: `<prefix>.bin` (flat tokens) and `<prefix>.idx`.

The index, as Megatron-LM's megatron/core/datasets/indexed_dataset.py writes it (and datatrove's
MegatronDocumentTokenizer, NeMo Curator, GPT-NeoX), little-endian:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the tokens in .bin (DTYPE_CODES)
    uint64    S, the number of sequences
    uint64    D, the number of document indices (documents + 1)
    int32[S]  sequence lengths, in tokens
    int64[S]  sequence pointers, byte offsets into .bin
    int64[D]  document indices: document i is sequences doc_idx[i] .. doc_idx[i+1] - 1

A document is usually one sequence (several when `preprocess_data.py --split-sentences`).
We read documents whose sequences lie back to back in .bin, which every writer produces.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from data_pipeline.formats.foreign import FormatError, TokenFile

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D
DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
TOKEN_CODES = (1, 4, 5, 8)  # the integer codes that can hold token ids; floats are refused
INDEX, DATA = ".idx", ".bin"


def code_for(dtype: np.dtype) -> int:
    """The dtype code Megatron reads our tokens as: uint16 is 8, uint32 ids (< 2**31 for any
    real vocabulary) are the same bytes as int32, code 4."""
    dtype = np.dtype(dtype)
    if dtype == np.uint32:
        return 4
    return next(c for c, d in DTYPE_CODES.items() if d == dtype)


def read_index(idx: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, pointers, document indices) of an .idx file, checked
    against its own header; every fault names the file."""
    size = idx.stat().st_size
    if size < HEADER.size:
        raise FormatError(f"{idx}: {size} bytes, shorter than the {HEADER.size}-byte header")
    with open(idx, "rb") as f:
        magic, version, code, s, d = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise FormatError(f"{idx}: not a Megatron index (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise FormatError(f"{idx}: index version {version}; only version {VERSION} is known")
    if code not in DTYPE_CODES:
        raise FormatError(
            f"{idx}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)}, Megatron's)"
        )
    if code not in TOKEN_CODES:
        raise FormatError(f"{idx}: dtype code {code} ({DTYPE_CODES[code]}) cannot hold token ids")
    expected = HEADER.size + 4 * s + 8 * s + 8 * d
    if size != expected:
        raise FormatError(
            f"{idx}: {size} bytes, but its header ({s} sequences, {d} document indices) "
            f"needs {expected}: truncated or not written by a Megatron writer"
        )
    mm = np.memmap(idx, dtype=np.uint8, mode="r")
    lengths = mm[HEADER.size : HEADER.size + 4 * s].view(np.int32)
    pointers = mm[HEADER.size + 4 * s : HEADER.size + 12 * s].view(np.int64)
    doc_idx = mm[HEADER.size + 12 * s :].view(np.int64)
    return DTYPE_CODES[code], lengths, pointers, doc_idx


def open_prefix(prefix: Path) -> TokenFile:
    """A prefix's tokens (memmap of .bin) and document boundaries in tokens."""
    idx, binf = prefix.with_name(prefix.name + INDEX), prefix.with_name(prefix.name + DATA)
    dtype, lengths, pointers, doc_idx = read_index(idx)
    item = dtype.itemsize
    ends = pointers + lengths.astype(np.int64) * item
    if len(lengths) and (pointers[0] != 0 or (pointers[1:] != ends[:-1]).any()):
        raise FormatError(f"{idx}: sequences are not back to back in {binf.name}")
    total = int(ends[-1]) if len(lengths) else 0
    if not binf.is_file() or binf.stat().st_size != total:
        have = f"{binf.stat().st_size} bytes" if binf.is_file() else "missing"
        raise FormatError(f"{binf}: {have}, but {idx.name} describes {total} bytes")
    if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != len(lengths):
        raise FormatError(
            f"{idx}: document indices must run from 0 to the sequence count {len(lengths)}"
        )
    if (np.diff(doc_idx) < 0).any():
        raise FormatError(f"{idx}: document indices decrease")
    seq_starts = np.concatenate([pointers, [total]]) // item
    tokens = np.memmap(binf, dtype=dtype, mode="r") if total else np.empty(0, dtype)
    return TokenFile(binf, tokens, seq_starts[np.asarray(doc_idx)].astype(np.int64))


def write_index(idx: Path, dtype: np.dtype, doc_lengths: np.ndarray) -> None:
    """An .idx for back-to-back documents of `doc_lengths` tokens, one sequence each (what
    Megatron's `preprocess_data.py` writes without --split-sentences)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{idx}: a document of {lengths.max()} tokens overflows int32 lengths")
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64) * dtype.itemsize
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(idx, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, code_for(dtype), len(lengths), len(doc_idx)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(doc_idx.astype("<i8").tobytes())
