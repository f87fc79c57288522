"""Which format a `data.path` holds, decided from its files, and its splits opened alike.

    our shards   a directory with manifest.json (data_pipeline/shards.py)
    hf           a directory `datasets.save_to_disk` wrote (state.json + dataset_info.json,
                 or dataset_dict.json)
    datatrove    a `.ds` file, or a directory with `.ds` files (searched recursively, as
                 datatrove's DatatroveFolderDataset does)
    megatron     a prefix with `<prefix>.bin` + `<prefix>.idx` (or either file's path), or a
                 directory with such pairs (recursively)

A directory holding more than one of these is refused naming a file of each: which one was
meant cannot be guessed, and mixing them would mix tokenizers silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline import shards
from data_pipeline.formats import datatrove, hf_saved, megatron
from data_pipeline.formats.declared import check_declared, declared_record
from data_pipeline.formats.foreign import ForeignSplit, FormatError, TokenFile
from data_pipeline.formats.split_rule import (
    RULE_BY_ID,
    RULE_BY_INDEX,
    validation_by_id,
    validation_by_index,
)

OURS = "opt-train"
FOREIGN = ("datatrove", "megatron", "hf")
SPLIT_SEED = 0  # the tokenize stage's default `seed`: one id lands in one split everywhere


@dataclass(frozen=True)
class ReadOptions:
    """How to read foreign data: its declared tokenizer (`data.tokenizer`) and the share of
    documents held out for validation (`data.validation_fraction`)."""

    tokenizer: str | None = None
    validation_fraction: float = 0.001


def _files(path: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in names if not n.startswith(".")]
    return sorted(found)


def _prefix(path: Path) -> Path | None:
    """The Megatron prefix `path` names (itself, or its .bin/.idx with the suffix dropped)."""
    if path.suffix in (megatron.INDEX, megatron.DATA):
        path = path.with_suffix("")
    if path.with_name(path.name + megatron.INDEX).is_file():
        return path
    return None


def detect(path: str | Path) -> str:
    """`opt-train`, `datatrove`, `megatron` or `hf`; refuses what is none or several."""
    return _detect(Path(path))[0]


def _detect(path: Path) -> tuple[str, list[Path]]:
    """The format and its files in order (Megatron: prefixes; hf: the dataset directory)."""
    if path.is_file() and path.name.endswith(datatrove.SUFFIX):
        return "datatrove", [path]
    prefix = _prefix(path)
    if prefix is not None and not path.is_dir():
        return "megatron", [prefix]
    if not path.is_dir():
        raise FormatError(f"{path}: no such directory, .ds file or Megatron .bin/.idx prefix")
    files = _files(path)
    kinds: dict[str, Path] = {}
    if (path / shards.MANIFEST).is_file():
        kinds[OURS] = path / shards.MANIFEST
    if hf_saved.is_saved_dataset(path):
        kinds["hf"] = path
    ds = [f for f in files if f.name.endswith(datatrove.SUFFIX)]
    idx = [f for f in files if f.suffix == megatron.INDEX]
    bins = [f for f in files if f.suffix == megatron.DATA]
    if ds:
        kinds["datatrove"] = ds[0]
    if idx or bins:
        kinds["megatron"] = (idx or bins)[0]
    if len(kinds) > 1:
        shown = "; ".join(f"{k}: {f}" for k, f in kinds.items())
        raise FormatError(f"{path}: holds token data of several formats ({shown}); point "
                          "data.path at one of them")  # fmt: skip
    if not kinds:
        raise FormatError(
            f"{path}: no token data found (expected {shards.MANIFEST}, datatrove .ds files, "
            "Megatron .bin/.idx pairs, or a directory saved by datasets.save_to_disk)"
        )
    fmt = next(iter(kinds))
    if fmt == "megatron":
        for f in bins:
            if not f.with_suffix(megatron.INDEX).is_file():
                raise FormatError(f"{f}: no {f.with_suffix(megatron.INDEX).name} beside it")
        return fmt, [f.with_suffix("") for f in idx]
    return fmt, ds if fmt == "datatrove" else [path]


def _open_files(fmt: str, found: list[Path], vocab: int, split: str) -> tuple[list, bool]:
    """The TokenFiles of `split`'s source and whether they are that split whole (an HF
    DatasetDict's own validation split) rather than to be split by the rule."""
    if fmt == "megatron":
        return [megatron.open_prefix(p) for p in found], False
    if fmt == "datatrove":
        return [datatrove.open_file(f, vocab) for f in found], False
    dirs = hf_saved.split_dirs(found[0])
    if "validation" in dirs:
        return hf_saved.open_dataset(dirs[split]), True
    return hf_saved.open_dataset(dirs.get("train", found[0])), False


def _held_out(files: list[TokenFile], fraction: float) -> tuple[list[np.ndarray], str]:
    """Each file's validation mask by the split rule, and the rule's description."""
    if all(f.ids is not None for f in files):
        return [validation_by_id(f.ids, fraction, SPLIT_SEED) for f in files], RULE_BY_ID
    masks, first = [], 0
    for f in files:
        masks.append(validation_by_index(first, f.num_documents, fraction, SPLIT_SEED))
        first += f.num_documents
    return masks, RULE_BY_INDEX


def open_split(
    path: str | Path, split: str, options: ReadOptions | None = None
) -> shards.SplitReader | ForeignSplit:
    """One split (`train` or `validation`) of the token data at `path`, whatever its format,
    with the reading interface of data_pipeline.shards.SplitReader."""
    path, options = Path(path), options or ReadOptions()
    fmt, found = _detect(path)
    if fmt == OURS:
        manifest = shards.read_manifest(path)
        check_declared(options.tokenizer, manifest, path)
        return shards.SplitReader(path, split, manifest)
    record = declared_record(options.tokenizer, path)
    files, whole = _open_files(fmt, found, int(record["vocab_size"]), split)
    if whole:
        keep, rule = [np.ones(f.num_documents, dtype=bool) for f in files], "the saved splits"
    else:
        masks, rule = _held_out(files, options.validation_fraction)
        keep = masks if split == "validation" else [~m for m in masks]
    return ForeignSplit(path, fmt, files, keep, split, record, rule)


def split_tokens(path: str | Path, split: str, options: ReadOptions | None = None) -> int:
    """Tokens of `split` (0 when our shards have no such split)."""
    path = Path(path)
    if _detect(path)[0] == OURS:
        entry = shards.read_manifest(path)["splits"].get(split)
        return int(entry["num_tokens"]) if entry else 0
    return open_split(path, split, options).num_tokens


def verify_data(path: str | Path, options: ReadOptions | None = None) -> None:
    """`data.verify`: our shards' sha256 against their manifest; foreign data (which records no
    hashes) read whole once, every id checked against the declared vocabulary."""
    path = Path(path)
    if _detect(path)[0] == OURS:
        shards.verify(path)
        return
    for split in ("train", "validation"):
        reader = open_split(path, split, options)
        vocab = int(reader.manifest["vocab_size"])
        for part in reader.parts:
            check_ids(part.file, vocab)


def check_ids(f: TokenFile, vocab: int, chunk: int = 1 << 24) -> None:
    """Refuse, naming the file and document, an id outside [0, vocab) in `f`."""
    for start in range(0, len(f.tokens), chunk):
        block = np.asarray(f.tokens[start : start + chunk]).astype(np.int64)
        bad = np.flatnonzero((block < 0) | (block >= vocab))
        if bad.size:
            pos = start + int(bad[0])
            doc = int(np.searchsorted(f.bounds, pos, side="right")) - 1
            raise FormatError(
                f"{f.path}: token id {int(block[bad[0]])} at token {pos} (document "
                f"{f.first_document + doc}) is outside the declared vocabulary [0, {vocab}); "
                "is data.tokenizer right?"
            )
