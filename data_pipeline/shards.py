"""The token shard format: what the pipeline writes and the trainer reads.

A shard set is a directory:

    manifest.json            format, version, tokenizer (name, file hashes), vocab_size, eos_id,
                             dtype, per split: counts and per-shard files with sha256, and the
                             pipeline config that made it
    train-00000.tokens       flat token ids (uint16 while the vocab fits, else uint32):
                             doc0 </s> doc1 </s> ... -- a separator after every document
    train-00000.index        flat int64 document boundaries, n_docs + 1 of them: document i is
                             tokens[index[i] : index[i+1] - 1] (the last token is the separator)
    validation-00000.*       the same for the held-out split

Both files are raw arrays, readable with `numpy.memmap`. A set is written into a temporary
sibling directory and renamed into place only when complete, so a killed writer never leaves a
directory with a manifest that looks finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from data_pipeline.files import publish_dir, sha256_file, temporary_beside
from data_pipeline.ownership import SHARD_FORMAT as FORMAT
from data_pipeline.ownership import SHARD_MANIFEST as MANIFEST
from data_pipeline.ownership import check_output, rmtree

VERSION = 1
SPLITS = ("train", "validation")


class ShardFormatError(ValueError):
    """A shard directory that is missing, incomplete or not in this format."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class _SplitWriter:
    def __init__(self, root: Path, split: str, dtype: np.dtype, max_shard_tokens: int):
        self.root, self.split, self.dtype = root, split, dtype
        self.max_shard_tokens = max_shard_tokens
        self.shards: list[dict] = []
        self._tok = self._idx = None
        self._offsets: list[int] = []

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self._name = name
        self._tok = open(self.root / f"{name}.tokens", "wb")
        self._offsets = [0]

    def _close_shard(self) -> None:
        if self._tok is None:
            return
        self._tok.close()
        idx_path = self.root / f"{self._name}.index"
        np.asarray(self._offsets, dtype=np.int64).tofile(idx_path)
        tok_path = self.root / f"{self._name}.tokens"
        self.shards.append(
            {
                "tokens": tok_path.name,
                "index": idx_path.name,
                "num_documents": len(self._offsets) - 1,
                "num_tokens": self._offsets[-1],
                "sha256": {"tokens": sha256_file(tok_path), "index": sha256_file(idx_path)},
            }
        )
        self._tok = None

    def add(self, ids: np.ndarray, eos_id: int) -> None:
        if self._tok is None:
            self._open()
        doc = np.empty(len(ids) + 1, dtype=self.dtype)
        doc[:-1] = ids
        doc[-1] = eos_id
        self._tok.write(doc.tobytes())
        self._offsets.append(self._offsets[-1] + len(doc))
        if self._offsets[-1] >= self.max_shard_tokens:
            self._close_shard()

    def close(self) -> dict:
        self._close_shard()
        return {
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "shards": self.shards,
        }


class ShardWriter:
    """Writes a shard set atomically: use as a context manager; nothing appears at `out_dir`
    unless the block completes."""

    def __init__(
        self,
        out_dir: str | Path,
        tokenizer: dict,
        pipeline_config: dict | None = None,
        max_shard_tokens: int = 1 << 28,
    ):
        self.out_dir = Path(out_dir)
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer["vocab_size"])
        self.eos_id = int(tokenizer["eos_id"])
        self.dtype = token_dtype(self.vocab_size)
        self.pipeline_config = pipeline_config or {}
        check_output(self.out_dir)  # refused before any work, not after it
        self.tmp_dir = temporary_beside(self.out_dir)
        rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        self._splits = {
            s: _SplitWriter(self.tmp_dir, s, self.dtype, max_shard_tokens) for s in SPLITS
        }
        self.extra: dict = {}

    def add(self, ids, split: str = "train") -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) in a document")
        self._splits[split].add(ids, self.eos_id)

    def close(self) -> Path:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "dtype": self.dtype.name,
            "splits": {s: w.close() for s, w in self._splits.items()},
            "pipeline": self.pipeline_config,
            **self.extra,
        }
        with open(self.tmp_dir / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        check_output(self.out_dir)  # checked again: it may have appeared meanwhile
        publish_dir(self.tmp_dir, self.out_dir, sync_files=True)
        return self.out_dir

    def abort(self) -> None:
        rmtree(self.tmp_dir)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ShardFormatError(f"{path}: no {MANIFEST}; not a complete token shard directory")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{mpath}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardFormatError(
            f"{mpath}: format {manifest.get('format')!r} v{manifest.get('version')!r}, "
            f"expected {FORMAT!r} v{VERSION}"
        )
    return manifest


def verify(path: str | Path) -> None:
    """Recompute every file's sha256 against the manifest; raises naming the first bad file."""
    path = Path(path)
    manifest = read_manifest(path)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for kind in ("tokens", "index"):
                f = path / shard[kind]
                if not f.is_file():
                    raise ShardFormatError(f"{f}: listed in the manifest but missing")
                if sha256_file(f) != shard["sha256"][kind]:
                    raise ShardFormatError(f"{f}: sha256 differs from the manifest (corrupted?)")


def read_across(
    starts: np.ndarray, start: int, length: int, piece: Callable[[int, int, int], np.ndarray]
) -> np.ndarray:
    """Tokens [start, start + length) of a stream made of parts that begin at `starts` (the
    last entry is the stream's length), as int64: `piece(part, local_start, n)` gives n tokens
    of one part. Shared by our shard sets and foreign data (data_pipeline.formats)."""
    total = int(starts[-1])
    if start < 0 or start + length > total:
        raise IndexError(f"read [{start}, {start + length}) outside stream of {total}")
    out = np.empty(length, dtype=np.int64)
    pos, filled = start, 0
    while filled < length:
        s = int(np.searchsorted(starts, pos, side="right")) - 1
        local = pos - int(starts[s])
        n = min(length - filled, int(starts[s + 1]) - pos)
        out[filled : filled + n] = piece(s, local, n)
        filled += n
        pos += n
    return out


class SplitReader:
    """One split of a shard set as a single token stream (shards concatenated in order)."""

    def __init__(self, path: str | Path, split: str, manifest: dict | None = None):
        self.path = Path(path)
        manifest = manifest or read_manifest(self.path)
        if split not in manifest["splits"]:
            raise ShardFormatError(
                f"{self.path}: no split {split!r}; has {sorted(manifest['splits'])}"
            )
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.tokens: list[np.ndarray] = []
        self.indexes: list[np.ndarray] = []
        for shard in manifest["splits"][split]["shards"]:
            tok = self.path / shard["tokens"]
            idx = self.path / shard["index"]
            expected = shard["num_tokens"] * self.dtype.itemsize
            if not tok.is_file() or tok.stat().st_size != expected:
                raise ShardFormatError(
                    f"{tok}: missing or not {expected} bytes as the manifest says"
                )
            self.tokens.append(
                np.memmap(tok, dtype=self.dtype, mode="r") if expected else np.empty(0, self.dtype)
            )
            self.indexes.append(np.fromfile(idx, dtype=np.int64))
        sizes = np.array([len(t) for t in self.tokens], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated stream, across shard boundaries."""
        return read_across(
            self.starts, start, length, lambda s, local, n: self.tokens[s][local : local + n]
        )

    def documents(self) -> Iterator[np.ndarray]:
        for tok, idx in zip(self.tokens, self.indexes, strict=True):
            for i in range(len(idx) - 1):
                yield np.asarray(tok[idx[i] : idx[i + 1] - 1])


def iter_documents(path: str | Path, split: str | None = None) -> Iterator[np.ndarray]:
    """Each stored document's token ids (separators excluded), in stored order; train first."""
    manifest = read_manifest(path)
    for s in [split] if split else [s for s in SPLITS if s in manifest["splits"]]:
        yield from SplitReader(path, s, manifest).documents()
