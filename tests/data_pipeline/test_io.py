"""data_pipeline.documents parses with orjson but must accept, reject and return exactly what the json
module does: these are the lines where the two libraries disagree."""

from __future__ import annotations

import json
import math

import pytest
import zstandard

from data_pipeline.documents import (
    AtomicWriter,
    Rejects,
    dumps_doc,
    iter_json_lines,
    iter_lines,
    loads_line,
)

AGREE = [
    b'{"text": "plain", "id": "1", "meta": {}}\n',
    '{"text": "caf\u00e9 \u2028 \u65e5\u672c"}'.encode(),
    b'{"a": 18446744073709551615, "b": -9223372036854775808, "c": [0.1, 1e5, -0.0]}',
    b'{"a": 1, "a": 2}',
]
# orjson refuses or changes these; json accepts them with these values
JSON_ONLY = [
    b'{"text": "\\ud800 lone surrogate"}',
    b'{"a": 123456789012345678901234567890}',
    b'{"a": [1, {"b": -98765432109876543210}]}',
    b'{"a": NaN, "b": Infinity}',
    b'{"a": 1e400}',
]


@pytest.mark.parametrize("raw", AGREE + JSON_ONLY)
def test_loads_line_returns_what_json_loads_returns(raw):
    got, want = loads_line(raw), json.loads(raw.decode("utf-8"))
    assert repr(got) == repr(want)  # repr: NaN != NaN, and int 10**29 must not be a float


@pytest.mark.parametrize(
    "raw, exc",
    [
        (b'{"text": "\xff"}', UnicodeDecodeError),
        (b'{"text": "\xed\xa0\x80"}', UnicodeDecodeError),  # a surrogate encoded as UTF-8
        (b"{not json", json.JSONDecodeError),
        (b'{"a": "ctrl\x01"}', json.JSONDecodeError),
        (b'\xef\xbb\xbf{"a": 1}', json.JSONDecodeError),
    ],
)
def test_loads_line_raises_what_json_raises(raw, exc):
    with pytest.raises(exc):
        loads_line(raw)


def test_rejects_keep_their_reasons_and_line_numbers(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"text": "ok"}\n\n{bad\n{"text": "\xff"}\n[1]\n  \n{"text": "\\udc00"}\n')
    rejects = Rejects(None)
    got = [(n, o["text"]) for n, o in iter_json_lines(f, rejects, required=("text",))]
    assert got == [(1, "ok"), (7, "\udc00")]
    assert rejects.counts[str(f)] == {
        "invalid json (Expecting property name enclosed in double quotes)": 1,
        "invalid utf-8 (invalid start byte at byte 10)": 1,
        "not a json object": 1,
    }


@pytest.mark.parametrize(
    "doc",
    [
        {"text": 'caf\u00e9 \u2028 \x7f "q" \\ \n\t', "id": "7", "meta": {"k": [1, 2.5, None]}},
        {"text": "big", "id": "1", "meta": {"n": 10**30}},
        {"text": "keys", "id": "1", "meta": {1: "int key"}},
    ],
)
def test_dumps_doc_is_one_utf8_line_that_json_reads_back(doc):
    line = dumps_doc(doc)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = json.loads(line.decode("utf-8"))
    assert back == json.loads(json.dumps(doc))


def test_dumps_doc_writes_nan_as_null_and_refuses_lone_surrogates():
    assert json.loads(dumps_doc({"x": math.nan})) == {"x": None}
    with pytest.raises(UnicodeEncodeError):
        dumps_doc({"text": "\ud800"})


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_atomic_writer_round_trips_documents(tmp_path, suffix):
    docs = [{"text": f"doc {i} \u00e9", "id": str(i), "meta": {}} for i in range(3000)]
    out = tmp_path / f"out{suffix}"
    with AtomicWriter(out) as w:
        for d in docs:
            w.write_doc(d)
        w.write('{"text": "via write", "id": "x", "meta": {}}\n')
    back = [o for _, o in iter_json_lines(out, Rejects(None))]
    assert back == [*docs, {"text": "via write", "id": "x", "meta": {}}]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def zstd_frames(tmp_path):
    """Two zstd frames (the second with a checksum) and a skippable frame between them."""
    a = b"".join(b'{"text": "a%d"}\n' % i for i in range(3000))
    b = b"".join(b'{"text": "b%d"}\n' % i for i in range(3000))
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    second = zstandard.ZstdCompressor(write_checksum=True).compress(b)
    return a + b, zstandard.ZstdCompressor().compress(a) + skippable + second


def test_zstd_reads_every_frame_in_bounded_pieces(tmp_path):
    data, packed = zstd_frames(tmp_path)
    f = tmp_path / "in.jsonl.zst"
    f.write_bytes(packed)
    assert b"".join(iter_lines(f, max_line_bytes=100)) == data


@pytest.mark.parametrize("cut", [1, 4, 100, 1000])
def test_zstd_cut_inside_the_last_frame_is_truncated_after_the_complete_lines(tmp_path, cut):
    data, packed = zstd_frames(tmp_path)
    f = tmp_path / "in.jsonl.zst"
    f.write_bytes(packed[:-cut])
    got = []
    with pytest.raises(EOFError, match="truncated"):
        for line in iter_lines(f, max_line_bytes=100):
            got.append(line)
    assert data.startswith(b"".join(got)) and all(x.endswith(b"\n") for x in got)
    assert len(got) >= 3000  # the first frame's lines at least
