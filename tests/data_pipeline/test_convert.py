"""`python -m data_pipeline.convert`: our shards as Megatron's and datatrove's files, read back
by a reader written here from Megatron's published index layout, by megatron-core's own
IndexedDataset and by datatrove's own dataset class as the same documents."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.formats import ReadOptions, open_split
from data_pipeline.ownership import NotOursError
from data_pipeline.shards import ShardWriter, iter_documents, read_manifest
from data_pipeline.stages.convert import ConvertConfig, run

REPO = Path(__file__).resolve().parents[2]
EOS = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two shards per split, OPT-like ids (the separator 2 never inside a document)."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("convert") / "shards"
    tok = {"name": "opt", "vocab_size": 50265, "eos_id": EOS}
    with ShardWriter(path, tok, max_shard_tokens=400) as w:
        for i in range(90):
            w.add(
                rng.integers(3, 50265, int(rng.integers(1, 40))),
                "validation" if i % 3 == 0 else "train",
            )
    return path


def ours(path: Path, split: str) -> list[list[int]]:
    return [d.tolist() for d in iter_documents(path, split)]


def read_megatron(prefix: Path) -> list[list[int]]:
    """Megatron-LM's indexed dataset, read from its published layout (magic, version, dtype
    code, sequence and document counts, int32 lengths, int64 pointers, int64 document
    indices), independently of data_pipeline.formats."""
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    assert version == 1
    dtype = {4: np.int32, 8: np.uint16}[code]
    off = 9 + 8 + 1 + 8 + 8
    lengths = np.frombuffer(raw, np.int32, n_seq, off)
    pointers = np.frombuffer(raw, np.int64, n_seq, off + 4 * n_seq)
    doc_idx = np.frombuffer(raw, np.int64, n_doc, off + 12 * n_seq)
    data = Path(f"{prefix}.bin").read_bytes()
    seqs = [
        np.frombuffer(data, dtype, n, p).tolist() for n, p in zip(lengths, pointers, strict=True)
    ]
    return [sum(seqs[a:b], []) for a, b in zip(doc_idx[:-1], doc_idx[1:], strict=True)]


def read_with_megatron_core(prefix: Path) -> list[list[int]]:
    """The same files through megatron-core's own IndexedDataset (what Megatron-LM, NeMo and
    their data loaders open): sequences joined into documents by its document indices."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    seqs = [ds[i].tolist() for i in range(len(ds))]
    bounds = ds.document_indices.tolist()
    return [sum(seqs[a:b], []) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def convert(shards: Path, output: Path, fmt: str) -> dict:
    return run(ConvertConfig(input=str(shards), output=str(output), format=fmt))


def test_megatron_output_is_our_documents_each_ending_in_the_separator(shards, tmp_path):
    out = tmp_path / "meg"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "data_pipeline.convert", f"input={shards}", f"output={out}"]
    done = subprocess.run([*cli, "format=megatron"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    manifest = read_manifest(shards)
    n = {s: len(manifest["splits"][s]["shards"]) for s in ("train", "validation")}
    assert n["train"] > 1 and n["validation"] > 1
    assert report["token_files"] == {"linked": n["train"] + n["validation"], "copied": 0}
    for split in ("train", "validation"):
        prefixes = sorted(p.with_suffix("") for p in (out / split).glob("*.idx"))
        assert len(prefixes) == n[split]
        docs = [d for p in prefixes for d in read_megatron(p)]
        assert docs == [[*d, EOS] for d in ours(shards, split)]
        assert [d for p in prefixes for d in read_with_megatron_core(p)] == docs
        # The token bytes are the shard's own file, hard-linked: nothing copied.
        src = shards / f"{prefixes[0].name}.tokens"
        assert os.stat(f"{prefixes[0]}.bin").st_ino == src.stat().st_ino
        # And our importer reads the converted files back as the same documents.
        back = open_split(out / split, "train", ReadOptions("opt", 0.0))
        assert [d.tolist() for d in back.documents()] == ours(shards, split)


def test_datatrove_output_reads_back_through_datatroves_dataset_class(shards, tmp_path):
    from datatrove.utils.dataset import DatatroveFileDataset, DatatroveFolderDataset

    out = tmp_path / "dt"
    report = convert(shards, out, "datatrove")
    assert report["splits"]["train"]["documents"] == len(ours(shards, "train"))
    for split in ("train", "validation"):
        folder = DatatroveFolderDataset(str(out / split), seq_len=8)
        docs = []
        for f in folder.files:  # the files datatrove found, in its order
            n = f.fsize // 2
            whole = DatatroveFileDataset(
                (f.file_path, folder.data_folder), n - 1, return_positions=True
            )[0]
            ids, pos = whole["input_ids"].tolist(), whole["positions"].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [n]
            docs += [ids[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        assert docs == [[*d, EOS] for d in ours(shards, split)]
    meta = next((out / "train").glob("*.ds.metadata")).read_text().splitlines()
    assert meta[0] == "opt|2" and int(meta[1]) > 0


def test_convert_replaces_its_own_output_and_refuses_anything_else(shards, tmp_path):
    out = tmp_path / "meg"
    convert(shards, out, "megatron")
    convert(shards, out, "datatrove")  # ours (its report is beside it): replaced
    assert sorted(p.name for p in (out / "train").iterdir())[0].endswith(".ds")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(NotOursError, match=r"output=.*notes exists and is not an opt-train"):
        convert(shards, foreign, "megatron")
    assert (foreign / "keep.txt").read_text() == "mine"
