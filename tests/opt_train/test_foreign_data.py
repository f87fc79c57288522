"""`train.py data.path=<foreign token data>`: datatrove's and Megatron's files (written by
datatrove's own tokenizers) and an HF dataset saved with `datasets` train, and the loader's
token stream is the documents those tools wrote, each followed by `</s>`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from data_pipeline.formats import FormatError
from data_pipeline.formats.megatron import write_index
from data_pipeline.formats.split_rule import is_validation, validation_by_index
from data_pipeline.shards import ShardWriter
from opt_train.data.loader import GlobalOrderLoader, build_data, open_sources
from opt_train.tools.hf_export import export_checkpoint
from opt_train.train.trainer import Trainer
from tests.data_pipeline.test_formats import datatrove_written  # noqa: F401 (a fixture)
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
def written(tmp_path_factory, datatrove_written) -> dict:  # noqa: F811 (the fixture)
    """datatrove's outputs (tests/data_pipeline/test_formats.py) and the same documents saved
    as an HF dataset with ids."""
    import datasets

    out = tmp_path_factory.mktemp("foreign-hf")
    encoded = datatrove_written["encoded"]
    ids = [f"doc-{i}" for i in range(len(encoded))]
    datasets.Dataset.from_dict({"input_ids": encoded, "id": ids}).save_to_disk(str(out / "hf"))
    return {**datatrove_written, "ids": ids, "hf": out / "hf"}


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
    # The HF export reads the tokenizer record of foreign data as the loader does; `opt`
    # declares the ids but not where the files are, so the export says what to do.
    with pytest.raises(ValueError, match=r"data.tokenizer=<directory with vocab.json"):
        export_checkpoint(tmp_path / "run", tmp_path / "hf-out")
    assert not (tmp_path / "hf-out").exists()


def data_cfg(**kw) -> SimpleNamespace:
    """A `data` section as open_sources reads it."""
    base = dict(path=None, sources=[], cache_dir="", verify=False, seq_len=8,
                tokenizer="opt", validation_fraction=0.0)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_foreign_and_our_sources_mix_only_under_one_tokenizer(tmp_path, written):
    def shards(name: str, record: dict) -> Path:
        with ShardWriter(tmp_path / name, record) as w:
            for doc in written["encoded"][:20]:
                w.add(np.array(doc))
        return tmp_path / name

    opt = shards("opt", {"name": "opt", "vocab_size": 50265, "eos_id": OPT_EOS})
    mix = [SimpleNamespace(name="m", path=str(written["megatron"]), weight=1.0),
           SimpleNamespace(name="o", path=str(opt), weight=1.0)]  # fmt: skip
    assert [s.name for s in open_sources(data_cfg(sources=mix))] == ["m", "o"]
    gpt2 = shards("gpt2", {"name": "gpt2", "vocab_size": 50257, "eos_id": 50256})
    mix[1].path = str(gpt2)
    with pytest.raises(FormatError, match=rf"{gpt2}: data.tokenizer=opt declares 'opt'"):
        open_sources(data_cfg(sources=mix))


def test_an_id_beyond_the_declared_vocabulary_stops_the_batch_naming_file_and_document(
    tmp_path,
):
    prefix = tmp_path / "meg" / "bad"
    prefix.parent.mkdir()
    doc = np.array([11, 12, 50260, 13, 50256], dtype=np.uint16)  # an OPT id, not a GPT-2 one
    np.tile(doc, 40).tofile(f"{prefix}.bin")
    write_index(Path(f"{prefix}.idx"), np.uint16, np.full(40, len(doc)))
    (source,) = open_sources(data_cfg(path=str(prefix), tokenizer="gpt2"))
    loader = GlobalOrderLoader(source.windows, 0, 4, 4, vocab_size=50257)
    loader.next_step()
    assert loader.bad_tokens and all(
        re.fullmatch(rf"id 50260 at {prefix}.bin, document \d+ \(token 2 of it\)", b)
        for b in loader.bad_tokens
    )
