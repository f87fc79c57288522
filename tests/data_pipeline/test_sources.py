"""Input specs: JSONL paths and streamed Hugging Face `datasets` sources give the same documents.

Everything runs offline (conftest sets HF_DATASETS_OFFLINE=1) with `datasets`' local loaders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline import shards
from data_pipeline.documents import Rejects
from data_pipeline.sources import iter_source_documents, local_files, normalize
from data_pipeline.stages.tokenize import TokenizeConfig, run

DOCS = [
    {"text": f"Document {i}: naïve café 🎉 {'word ' * i}", "id": f"doc-{i}", "meta": {"k": i}}
    for i in range(25)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read(spec, rejects: Rejects | None = None) -> list[dict]:
    return list(iter_source_documents(spec, rejects or Rejects(None)))


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch) -> Path:
    """A private `datasets` cache, so a test can see what a load wrote to disk. (`datasets`
    reads HF_DATASETS_CACHE once at import, so the module setting is what must change.)"""
    import datasets.config

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hf_json_source_yields_the_same_documents_as_the_jsonl_reader(tmp_path):
    a = write_jsonl(tmp_path / "data" / "a.jsonl", DOCS[:10])
    write_jsonl(tmp_path / "data" / "b.jsonl", DOCS[10:])
    from_jsonl = read(str(tmp_path / "data"))
    from_hf = read({"hf": {"path": "json", "data_files": [str(a), str(tmp_path / "data/b.jsonl")]}})
    assert from_hf == from_jsonl == DOCS


def test_hf_source_streams_without_writing_the_dataset_into_the_cache(tmp_path, hf_cache):
    import datasets

    def arrow_files():
        return sorted(hf_cache.rglob("*.arrow"))

    data = write_jsonl(tmp_path / "a.jsonl", DOCS * 40)
    assert len(read({"hf": {"path": "json", "data_files": str(data)}})) == len(DOCS) * 40
    assert arrow_files() == []
    # the control: a non-streaming load of the same files does land in this cache
    datasets.load_dataset("json", data_files=str(data), split="train")
    assert arrow_files() != []


def test_hf_text_id_and_meta_fields_are_configurable(tmp_path):
    rows = [{"content": d["text"], "uid": i, "info": {"lang": "en"}} for i, d in enumerate(DOCS)]
    data = write_jsonl(tmp_path / "a.jsonl", rows)
    spec = {
        "hf": {
            "path": "json",
            "data_files": str(data),
            "text_field": "content",
            "id_field": "uid",
            "meta_field": "info",
        }
    }
    docs = read(spec)
    assert [d["text"] for d in docs] == [d["text"] for d in DOCS]
    assert [d["id"] for d in docs] == [str(i) for i in range(25)]
    assert docs[0]["meta"] == {"lang": "en"}


def test_hf_rows_without_id_get_label_and_row_number(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    docs = read({"hf": {"path": "json", "data_files": str(data), "split": "train"}})
    assert [d["id"] for d in docs] == ["hf:json:train:1", "hf:json:train:2"]


def test_a_local_data_dir_loads_without_a_script(tmp_path):
    import datasets

    d = tmp_path / "my_dataset"
    d.mkdir()
    datasets.Dataset.from_list([{"text": x["text"], "id": x["id"]} for x in DOCS]).to_parquet(
        str(d / "train-00000-of-00001.parquet")
    )
    docs = read({"hf": {"path": str(d), "split": "train"}, "name": "mine"})
    assert [x["text"] for x in docs] == [x["text"] for x in DOCS]
    assert all(x["meta"] == {"source": "mine"} for x in docs)
    assert local_files({"hf": {"path": str(d)}}) == [d / "train-00000-of-00001.parquet"]


def test_hf_rows_with_empty_missing_or_non_string_text_are_rejected_by_row(tmp_path):
    rows = [{"text": "good one"}, {"text": ""}, {"text": "   "}, {"other": 1}, {"text": "good two"}]
    data = write_jsonl(tmp_path / "a.jsonl", rows)
    rejects = Rejects(tmp_path / "rejects.jsonl")
    docs = read({"hf": {"path": "json", "data_files": str(data)}}, rejects)
    rejects.close()
    assert [d["text"] for d in docs] == ["good one", "good two"]
    assert rejects.report()["by_file"] == {
        "hf:json:train": {"empty text": 2, "missing field 'text'": 1}
    }
    lines = [json.loads(x)["line"] for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert lines == [2, 3, 4]


def test_limit_stops_reading_after_that_many_rows(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", DOCS)
    assert len(read({"hf": {"path": "json", "data_files": str(data), "limit": 7}})) == 7


def test_a_list_of_sources_is_read_in_order_and_names_tag_meta_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    b = write_jsonl(tmp_path / "b.jsonl", DOCS[3:5])
    docs = read([{"jsonl": str(b), "name": "bee"}, {"hf": {"path": "json", "data_files": str(a)}}])
    assert [d["id"] for d in docs] == ["doc-3", "doc-4", "doc-0", "doc-1", "doc-2"]
    assert docs[0]["meta"] == {"k": 3, "source": "bee"}
    assert docs[2]["meta"] == {"k": 0}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"hf": {"path": "json"}, "jsonl": "x"}, "exactly one of"),
        ({"hf": {"data_files": "x"}}, "needs at least 'path'"),
        ({"hf": {"path": "json", "text_feild": "t"}}, "text_feild"),
        ({"jsonl": "x", "weight": 2}, "weight"),
        ([], "input is empty"),
    ],
)
def test_malformed_specs_are_refused_before_reading(spec, message):
    with pytest.raises(ValueError, match=message):
        normalize(spec)


def test_tokenize_reads_an_hf_source_into_the_same_shards_as_jsonl(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", DOCS)
    common = dict(validation_fraction=0.2)
    run(TokenizeConfig(input=str(data), output=str(tmp_path / "j"), **common))
    run(
        TokenizeConfig(
            input={"hf": {"path": "json", "data_files": str(data)}},
            output=str(tmp_path / "h"),
            **common,
        )
    )
    mj, mh = shards.read_manifest(tmp_path / "j"), shards.read_manifest(tmp_path / "h")
    assert mj["splits"] == mh["splits"]
    assert mh["pipeline"]["config"]["input"]["hf"]["path"] == "json"


def test_ingest_shares_an_hf_source_by_its_file_shards_with_the_same_bytes(tmp_path):
    """A streamed HF source of 3 files is read as 3 shards by 3 tasks into the bytes one task
    writes; rows without an id are named by their shard and row, whatever the split."""
    from data_pipeline.stages.ingest import IngestConfig
    from data_pipeline.stages.ingest import run as ingest

    files = [write_jsonl(tmp_path / "data" / f"{k}.jsonl", DOCS[8 * k : 8 * k + 8])
             for k in range(3)]  # fmt: skip
    with open(files[1], "a") as f:
        f.write(json.dumps({"text": "a row with no id"}) + "\n")
    spec = {"hf": {"path": "json", "data_files": [str(f) for f in files]}}

    def out(tasks: int) -> list[bytes]:
        o = tmp_path / f"out{tasks}"
        rep = ingest(
            IngestConfig(input=spec, output=str(o), source="s", tasks=tasks, progress=False)
        )
        assert rep["tasks"] == tasks and rep["documents"] == 25
        return [p.read_bytes() for p in sorted(o.iterdir())]

    one, three = out(1), out(3)
    assert (
        len(one) == 1
        and len(three) == 3
        and b"".join(map(zstd_decompress, three)) == b"".join(map(zstd_decompress, one))
    )
    docs = read(str(tmp_path / "out3"))
    assert [d["id"] for d in docs][:2] == ["s/doc-0", "s/doc-1"]
    assert "s/hf:json:train#1:9" in {d["id"] for d in docs}
    assert all(d["meta"]["source"] == "s" for d in docs)


def zstd_decompress(b: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(b)
