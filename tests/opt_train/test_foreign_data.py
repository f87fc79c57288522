"""`train.py data.path=<foreign token data>`: datatrove's and Megatron's files (written by
datatrove's own tokenizers) and an HF dataset saved with `datasets` train, and the loader's
token stream is the documents those tools wrote, each followed by `</s>`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.formats.split_rule import is_validation, validation_by_index
from opt_train.data.loader import build_data
from opt_train.train.trainer import Trainer
from tests.data_pipeline.test_formats import encode_all, hf_tokenizer_file, run_datatrove
from tests.opt_train.conftest import small_job

OPT_EOS = 2
# OPT's tokenizer ids need OPT's embedding rows (50,265 padded to 50,272).
FOREIGN = [
    "model.vocab_size=50272",
    "data.tokenizer=opt",
    "data.validation_fraction=0.2",
    "train.batch_tokens=128",  # one micro-batch of 4: the 50,272-row head dominates a step
    "train.max_steps=2",
    "train.eval_interval=2",
    "train.eval_batches=1",
]


@pytest.fixture(scope="module")
def written(tmp_path_factory, opt_tokenizer_dir) -> dict:
    import datasets

    out = tmp_path_factory.mktemp("foreign-train")
    tokenizer_file = hf_tokenizer_file(opt_tokenizer_dir, out)
    encoded = encode_all(tokenizer_file)
    ids = [f"doc-{i}" for i in range(len(encoded))]
    datasets.Dataset.from_dict({"input_ids": encoded, "id": ids}).save_to_disk(str(out / "hf"))
    return {"encoded": encoded, "ids": ids, "hf": out / "hf", **run_datatrove(out, tokenizer_file)}


def stream_of(docs: list[list[int]]) -> np.ndarray:
    return np.array([t for d in docs for t in [*d, OPT_EOS]], dtype=np.int64)


def datatrove_order(path: Path) -> list[list[int]]:
    """The documents of datatrove's `.ds` file in the order it stored them (it shuffles)."""
    (ds,) = path.glob("*.ds")
    tokens = np.fromfile(ds, dtype=np.uint16).astype(int)
    ends = np.fromfile(str(ds) + ".index", dtype=np.uint64).astype(int)
    return [tokens[a:b].tolist() for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def expected_splits(fmt: str, written: dict) -> tuple[list, list]:
    if fmt == "hf":
        docs = written["encoded"]
        held = [is_validation(i, 0.2, 0) for i in written["ids"]]
    else:
        docs = datatrove_order(written["ds"]) if fmt == "ds" else written["encoded"]
        held = validation_by_index(0, len(docs), 0.2, 0)
    return (
        [d for d, h in zip(docs, held, strict=True) if not h],
        [d for d, h in zip(docs, held, strict=True) if h],
    )


@pytest.mark.parametrize("fmt", ["ds", "megatron", "hf"])
def test_foreign_data_trains_and_the_loader_yields_the_written_documents(tmp_path, written, fmt):
    cfg = small_job(tmp_path / "run", written[fmt], *FOREIGN)
    train_docs, val_docs = expected_splits(fmt, written)
    loader, val_sets = build_data(cfg)
    windows = loader.sources[0].windows
    # Every window is its slice of the written documents' stream, `</s>` after each.
    stream = stream_of(train_docs)
    for w in range(len(windows)):
        assert np.array_equal(windows.window(w), stream[w * 32 : w * 32 + 33])
    first_val = val_sets[0].batches[0][0][0].numpy()
    assert np.array_equal(first_val, stream_of(val_docs)[:32])
    last = Trainer(cfg).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert np.isfinite(last["loss"]) and any("val_loss" in r for r in rows)
