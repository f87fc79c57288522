"""A dataset saved by HF `datasets` (`Dataset.save_to_disk` / `DatasetDict.save_to_disk`) with
an `input_ids` column of token-id lists, read from its Arrow files memory-mapped: each record
batch's flat values are the tokens, its list offsets the document bounds (no copy).

A `DatasetDict` gives its `train` split for training and its `validation` split, when it has
one, for validation; otherwise the split rule (split_rule.py) holds documents out, by the
`id` column when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipeline.formats.foreign import FormatError, TokenFile

DATASET_MARKERS = ("state.json", "dataset_info.json")
DICT_MARKER = "dataset_dict.json"
COLUMN, ID_COLUMN = "input_ids", "id"


def is_saved_dataset(path: Path) -> bool:
    return (path / DICT_MARKER).is_file() or all((path / m).is_file() for m in DATASET_MARKERS)


def split_dirs(path: Path) -> dict[str, Path]:
    """The saved dataset's split directories: {"": path} for a plain Dataset."""
    if not (path / DICT_MARKER).is_file():
        return {"": path}
    splits = json.loads((path / DICT_MARKER).read_text())["splits"]
    if "train" not in splits:
        raise FormatError(f"{path / DICT_MARKER}: no 'train' split (has {splits})")
    return {s: path / s for s in splits}


def open_dataset(path: Path) -> list[TokenFile]:
    """One TokenFile per Arrow record batch of a saved Dataset's `input_ids` (documents are
    numbered by row over the whole dataset: `first_document`)."""
    import datasets

    ds = datasets.load_from_disk(str(path), keep_in_memory=False)
    if not isinstance(ds, datasets.Dataset):
        raise FormatError(f"{path}: expected one saved Dataset, found {type(ds).__name__}")
    if ds._indices is not None:
        raise FormatError(
            f"{path}: saved with an indices mapping (after select/shuffle/filter): the rows are "
            "not stored in order; save ds.flatten_indices() instead"
        )
    if COLUMN not in ds.column_names:
        raise FormatError(f"{path}: no {COLUMN!r} column (has {ds.column_names})")
    table = ds.data.table
    column = table.column(COLUMN)
    ids = None
    if ID_COLUMN in table.column_names:
        ids = [str(i) for i in table.column(ID_COLUMN).to_pylist()]
    files, row = [], 0
    for chunk in column.chunks:
        if chunk.null_count or chunk.values.null_count:
            raise FormatError(f"{path}: null {COLUMN} in rows {row}..{row + len(chunk) - 1}")
        try:
            values = chunk.values.to_numpy(zero_copy_only=True)
        except Exception as e:  # pyarrow.ArrowInvalid: a non-integer column
            raise FormatError(f"{path}: {COLUMN} is {chunk.type}, not lists of ids") from e
        if not np.issubdtype(values.dtype, np.integer):
            raise FormatError(f"{path}: {COLUMN} holds {values.dtype}, not integer token ids")
        bounds = chunk.offsets.to_numpy().astype(np.int64)
        chunk_ids = ids[row : row + len(chunk)] if ids is not None else None
        files.append(TokenFile(path, values, bounds, chunk_ids, first_document=row))
        row += len(chunk)
    return files
