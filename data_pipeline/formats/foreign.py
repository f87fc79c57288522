"""One split of foreign token data with the interface of data_pipeline.shards.SplitReader.

Each format's reader gives a list of `TokenFile`s: a flat token array (a `numpy.memmap` of
the file where the format allows, so nothing is loaded) and its document boundaries. Here they
become one token stream: the split's documents in stored order, each followed by the separator.
A document whose last token is already the separator (datatrove and Megatron with
`eos_token` set) is read as it is; one without gets the separator appended as it is read. A read
that lies within adjacent documents carrying their own separators is a plain slice of the
memmap; otherwise it is copied document by document from the memmap, separators put in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.shards import ShardFormatError, read_across


class FormatError(ShardFormatError):
    """Foreign token data that is malformed, truncated or ambiguous; names the file."""


@dataclass
class TokenFile:
    """One file's tokens and document boundaries (`bounds[i]:bounds[i+1]` is document i).
    `ids`: each document's id where the format has one (the id-hash split rule);
    `first_document`: the number of its first document in `path` (an HF record batch)."""

    path: Path
    tokens: np.ndarray
    bounds: np.ndarray
    ids: list[str] | None = None
    first_document: int = 0

    @property
    def num_documents(self) -> int:
        return len(self.bounds) - 1


@dataclass
class _Part:
    """The split's documents of one file: raw starts and lengths, and the stream's bounds."""

    file: TokenFile
    doc_numbers: np.ndarray  # which documents of the file (for messages)
    starts: np.ndarray
    lengths: np.ndarray  # without an appended separator
    has_sep: np.ndarray  # the document's own last token is the separator
    stream_bounds: np.ndarray = field(init=False)
    plain: bool = field(init=False)

    def __post_init__(self) -> None:
        # Every document is its content and one separator (its own, or appended).
        sizes = self.lengths + 1
        self.stream_bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        whole = len(self.doc_numbers) == self.file.num_documents
        self.plain = bool(whole and self.has_sep.all())

    @property
    def num_tokens(self) -> int:
        return int(self.stream_bounds[-1])

    def read(self, local: int, n: int, eos_id: int) -> np.ndarray:
        if self.plain:
            first = int(self.file.bounds[0])
            return np.asarray(self.file.tokens[first + local : first + local + n])
        # A window inside a run of adjacent kept documents that carry their own separators is
        # one slice of the file (most windows when few documents are held out).
        d0, d1 = np.searchsorted(self.stream_bounds, [local, local + n - 1], side="right") - 1
        raw0 = int(self.starts[d0]) + local - int(self.stream_bounds[d0])
        raw1 = int(self.starts[d1]) + local + n - 1 - int(self.stream_bounds[d1])
        if raw1 - raw0 == n - 1 and self.has_sep[d0 : d1 + 1].all():
            return np.asarray(self.file.tokens[raw0 : raw1 + 1])
        # Document by document: its content is a slice, then its separator.
        out = np.empty(n, dtype=np.int64)
        end = local + n
        bounds = self.stream_bounds[d0 : d1 + 2].tolist()
        starts, lengths = self.starts[d0 : d1 + 1].tolist(), self.lengths[d0 : d1 + 1].tolist()
        for b, s, length in zip(bounds, starts, lengths, strict=False):
            sep = b + length  # the separator's stream position
            lo, hi = max(b, local), min(sep, end)
            if hi > lo:
                out[lo - local : hi - local] = self.file.tokens[s + lo - b : s + hi - b]
            if local <= sep < end:
                out[sep - local] = eos_id
        return out


class ForeignSplit:
    """A split of foreign token data, read like our SplitReader: `read`, `documents`,
    `num_tokens`, `manifest` (a synthesised record: tokenizer, vocab_size, eos_id, splits),
    `indexes` (stream bounds per file) and `locate` (file and document of a stream position)."""

    def __init__(
        self, path: Path, fmt: str, files: list[TokenFile], keep: list[np.ndarray],
        split: str, tokenizer: dict, rule: str,
    ):  # fmt: skip
        self.path = path
        self.format = fmt
        self.split = split
        self.eos_id = int(tokenizer["eos_id"])
        dtypes = {f.tokens.dtype for f in files}
        self.dtype = np.dtype(np.uint32) if len(dtypes) > 1 else next(iter(dtypes))
        self.parts = [self._part(f, k) for f, k in zip(files, keep, strict=True)]
        self.indexes = [p.stream_bounds for p in self.parts]
        self.tokens = [p.file.tokens for p in self.parts]
        sizes = np.array([p.num_tokens for p in self.parts], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self.starts[-1])
        shards = [
            {"tokens": str(p.file.path), "num_documents": len(p.doc_numbers),
             "num_tokens": p.num_tokens}
            for p in self.parts
        ]  # fmt: skip
        self.manifest = {
            "format": fmt,
            "tokenizer": tokenizer,
            "vocab_size": int(tokenizer["vocab_size"]),
            "eos_id": self.eos_id,
            "dtype": self.dtype.name,
            "split": {"rule": rule},
            "splits": {
                split: {
                    "num_documents": sum(len(p.doc_numbers) for p in self.parts),
                    "num_tokens": self.num_tokens,
                    "shards": shards,
                }
            },
        }

    def _part(self, f: TokenFile, keep: np.ndarray) -> _Part:
        numbers = np.flatnonzero(keep)
        starts = f.bounds[:-1][numbers].astype(np.int64)
        lengths = (f.bounds[1:][numbers] - starts).astype(np.int64)
        has_sep = np.zeros(len(numbers), dtype=bool)
        nonempty = lengths > 0
        if nonempty.any():
            last = np.asarray(f.tokens[starts[nonempty] + lengths[nonempty] - 1])
            has_sep[nonempty] = last == self.eos_id
        return _Part(f, numbers, starts, lengths - has_sep, has_sep)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream, across file boundaries."""
        return read_across(
            self.starts,
            start,
            length,
            lambda s, local, n: self.parts[s].read(local, n, self.eos_id),
        )

    def documents(self) -> Iterator[np.ndarray]:
        """Each document of the split, without its separator, in stored order."""
        for p in self.parts:
            for s, n in zip(p.starts.tolist(), p.lengths.tolist(), strict=True):
                yield np.asarray(p.file.tokens[s : s + n])

    def locate(self, pos: int) -> str:
        """Where token `pos` of the stream is stored: file, document, token of it."""
        s = int(np.searchsorted(self.starts, pos, side="right")) - 1
        p = self.parts[s]
        local = pos - int(self.starts[s])
        d = int(np.searchsorted(p.stream_bounds, local, side="right")) - 1
        k = local - int(p.stream_bounds[d])
        what = "its appended separator" if k >= p.lengths[d] else f"token {k} of it"
        number = p.file.first_document + int(p.doc_numbers[d])
        return f"{p.file.path}, document {number} ({what})"
