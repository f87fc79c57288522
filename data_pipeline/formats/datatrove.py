"""datatrove's tokenized files (datatrove.pipeline.tokens.tokenizer.TokenizedFile, what
DocumentTokenizer writes and nanotron reads), in a directory, taken in name order:

    <name>.ds            flat token ids, little-endian uint16 (token_size 2) or uint32 (4)
    <name>.ds.index      uint64 document ends, one per document (no leading 0)
    <name>.ds.metadata   text: "<tokenizer name>|<token_size>", the token count, a
                         human-readable count (optional here; its token_size wins when present)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.formats.foreign import FormatError, TokenFile

SUFFIX = ".ds"
INDEX = ".ds.index"
METADATA = ".ds.metadata"
INDEX_DTYPE = np.dtype("<u8")
TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def token_size_for(vocab_size: int) -> int:
    """datatrove's rule (PipelineStepWithTokenizer.token_size): 4 bytes above 65,536 ids."""
    return 4 if vocab_size > np.iinfo(np.uint16).max + 1 else 2


def read_metadata(path: Path) -> tuple[str, int, int] | None:
    """(tokenizer name, token_size, token count) of a `.ds.metadata`, or None when absent."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        name, size = lines[0].rsplit("|", 1)
        return name, int(size), int(lines[1])
    except (IndexError, ValueError):
        raise FormatError(
            f"{path}: expected '<tokenizer>|<token_size>' and a token count on its first lines"
        ) from None


def open_file(ds: Path, vocab_size: int) -> TokenFile:
    """One `.ds` file's tokens (memmap) and document bounds, checked against its index and
    metadata."""
    meta_path = ds.with_name(ds.name[: -len(SUFFIX)] + METADATA)
    meta = read_metadata(meta_path)
    size = meta[1] if meta else token_size_for(vocab_size)
    if size not in TOKEN_DTYPES:
        raise FormatError(f"{meta_path}: token_size {size}; datatrove writes 2 or 4")
    dtype = TOKEN_DTYPES[size]
    nbytes = ds.stat().st_size
    if nbytes % size:
        raise FormatError(f"{ds}: {nbytes} bytes, not a whole number of {size}-byte tokens")
    n = nbytes // size
    if meta and meta[2] != n:
        raise FormatError(
            f"{ds}: {n} tokens, but its .metadata says {meta[2]}: truncated or replaced"
        )
    index = ds.with_name(ds.name[: -len(SUFFIX)] + INDEX)
    if not index.is_file():
        raise FormatError(
            f"{index}: missing; without it the document boundaries are unknown "
            "(DocumentTokenizer(save_index=True) writes it)"
        )
    if index.stat().st_size % INDEX_DTYPE.itemsize:
        raise FormatError(f"{index}: {index.stat().st_size} bytes, not whole uint64 entries")
    ends = np.fromfile(index, dtype=INDEX_DTYPE).astype(np.int64)
    if len(ends) and (ends[-1] != n or (np.diff(ends) < 0).any() or ends[0] < 0):
        raise FormatError(
            f"{index}: document ends must rise to the {n} tokens of {ds.name}, "
            f"last is {int(ends[-1])}: truncated or not this file's index"
        )
    if not len(ends) and n:
        raise FormatError(f"{index}: empty, but {ds.name} holds {n} tokens")
    tokens = np.memmap(ds, dtype=dtype, mode="r") if n else np.empty(0, dtype)
    return TokenFile(ds, tokens, np.concatenate([[0], ends]).astype(np.int64))


def write_index(index: Path, doc_ends: np.ndarray) -> None:
    np.asarray(doc_ends, dtype=INDEX_DTYPE).tofile(index)


def write_metadata(path: Path, tokenizer_name: str, token_size: int, token_count: int) -> None:
    """The `.ds.metadata` TokenizedFile.write_final_metadata writes (its third line, a
    humanised count, is for people: written plainly here)."""
    path.write_text(f"{tokenizer_name}|{token_size}\n{token_count}\n{token_count} tokens")
