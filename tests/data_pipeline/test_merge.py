"""Merging per-task token shard sets gives one run's shard set, document for document."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import shards
from data_pipeline.shards import ShardWriter
from data_pipeline.stages.merge import MergeConfig, list_parts, run
from data_pipeline.stages.tokenize import TokenizeConfig
from data_pipeline.stages.tokenize import run as tokenize

REPO = Path(__file__).resolve().parents[2]


def write_inputs(root: Path, files: int = 3, docs: int = 40) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        p = root / f"in-{f:02d}.jsonl"
        with open(p, "w") as out:
            for i in range(docs):
                text = f"file {f} document {i}: " + "lorem ipsum dolor " * (1 + (i * 7) % 13)
                out.write(json.dumps({"text": text, "id": f"f{f}-{i}", "meta": {}}) + "\n")
        paths.append(p)
    return paths


def docs(path: Path, split: str) -> list[list[int]]:
    return [d.tolist() for d in shards.iter_documents(path, split)]


def test_merged_parts_equal_one_tokenize_run_over_all_inputs(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    # A high validation fraction so both splits have documents from every part.
    common = {"validation_fraction": 0.2, "max_shard_tokens": 2000}
    whole = tmp_path / "whole"
    tokenize(TokenizeConfig(input=[str(p) for p in inputs], output=str(whole), **common))
    for i, p in enumerate(inputs):
        tokenize(
            TokenizeConfig(input=str(p), output=str(tmp_path / f"parts/part-{i:05d}"), **common)
        )
    report = run(MergeConfig(input=str(tmp_path / "parts"), output=str(tmp_path / "merged")))

    merged = tmp_path / "merged"
    shards.verify(merged)
    for split in ("train", "validation"):
        assert docs(merged, split) == docs(whole, split) and docs(whole, split)
    m, w = shards.read_manifest(merged), shards.read_manifest(whole)
    for key in ("tokenizer", "vocab_size", "eos_id", "dtype", "split"):
        assert m[key] == w[key]
    for split in ("train", "validation"):
        assert m["splits"][split]["num_tokens"] == w["splits"][split]["num_tokens"]
        assert report["splits"][split]["documents"] == w["splits"][split]["num_documents"]
    assert m["pipeline"]["stage"] == "merge" and len(m["pipeline"]["upstream"]) == 3
    assert report["parts"] == 3


def test_parts_are_listed_in_name_order_and_writer_temporaries_are_skipped(tmp_path):
    tok = {"name": "synthetic", "vocab_size": 100, "eos_id": 0}
    for name in ("part-00002", "part-00000", "part-00001", ".part-00003.tmp-9"):
        with ShardWriter(tmp_path / "parts" / name, tok) as w:
            w.add(np.array([int(name[-1]) + 1]))
    (tmp_path / "parts" / "part-00000.report.json").write_text("{}")
    names = [p.name for p in list_parts(str(tmp_path / "parts"))]
    assert names == ["part-00000", "part-00001", "part-00002"]
    assert [p.name for p in list_parts(str(tmp_path / "parts" / "part-0000[12]"))] == [
        "part-00001",
        "part-00002",
    ]


def test_parts_from_different_tokenizers_are_refused_naming_the_part(tmp_path):
    with ShardWriter(tmp_path / "a", {"name": "x", "vocab_size": 100, "eos_id": 0}) as w:
        w.add(np.array([1, 2]))
    with ShardWriter(tmp_path / "b", {"name": "y", "vocab_size": 100, "eos_id": 0}) as w:
        w.add(np.array([1, 2]))
    with pytest.raises(ValueError, match=r"b: tokenizer differs"):
        run(
            MergeConfig(
                input=[str(tmp_path / "a"), str(tmp_path / "b")], output=str(tmp_path / "m")
            )
        )
    assert not (tmp_path / "m").exists()


def test_command_line(tmp_path):
    tok = {"name": "synthetic", "vocab_size": 100, "eos_id": 0}
    for i in range(2):
        with ShardWriter(tmp_path / f"p{i}", tok) as w:
            w.add(np.array([i + 1, i + 2]))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.stages.merge",
            f"input={tmp_path}/p*",
            f"output={tmp_path}/m",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert docs(tmp_path / "m", "train") == [[1, 2], [2, 3]]
    assert (tmp_path / "m.report.json").is_file()
