"""SplitReader.read over a split stored in many shards: reads that start, end or lie across
shard boundaries give the stream the documents make (each followed by its separator)."""

import json

import numpy as np
import pytest

from data_pipeline.shards import ShardWriter, SplitReader


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, int(rng.integers(1, 40))) for _ in range(60)]
    path = tmp_path_factory.mktemp("shards") / "set"
    tok = {"name": "synthetic", "vocab_size": 1000, "eos_id": 0}
    # Shards close after the document that reaches 50 tokens: uneven sizes, ~25 shards.
    with ShardWriter(path, tok, max_shard_tokens=50) as w:
        for d in docs:
            w.add(d)
    stream = np.concatenate([np.append(d, 0) for d in docs])  # the reference, built apart
    return path, stream


def test_reads_across_every_shard_boundary_equal_the_document_stream(many_shards):
    path, stream = many_shards
    manifest = json.loads((path / "manifest.json").read_text())
    sizes = [s["num_tokens"] for s in manifest["splits"]["train"]["shards"]]
    assert len(sizes) >= 10 and len(set(sizes)) > 1  # really many uneven shards
    r = SplitReader(path, "train")
    assert r.num_tokens == len(stream)
    boundaries = np.cumsum(sizes)[:-1]
    for b in boundaries:
        for start in range(b - 3, b + 2):
            for length in (1, 2, 5, 60):  # 60 > 50: spans two or three shards
                length = min(length, len(stream) - start)
                got = r.read(int(start), int(length))
                assert got.tolist() == stream[start : start + length].tolist(), (start, length)
    assert r.read(0, len(stream)).tolist() == stream.tolist()  # every shard in one read


def test_read_past_the_end_says_where(many_shards):
    path, stream = many_shards
    r = SplitReader(path, "train")
    with pytest.raises(IndexError, match=f"outside stream of {len(stream)}"):
        r.read(len(stream) - 2, 3)
