"""Bounded input: a line longer than `max_line_bytes` is a reject streamed past in bounded reads
(never held whole), and the rejects file stops at `max_rejects` records, counting the rest."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zstandard

from data_pipeline.chain import ChainConfig, CorpusConfig
from data_pipeline.chain import run as run_chain
from data_pipeline.documents import InputLimits, Rejects, iter_json_lines
from data_pipeline.stages.clean import CleanConfig, run
from data_pipeline.stages.dedup import DedupConfig
from data_pipeline.stages.dedup import run as run_dedup

LIMITS = InputLimits(max_line_bytes=1000, max_rejects=10_000, reject_text_bytes=64)
LONG = b'{"text": "' + b"y" * 5000 + b'"}\n'


def write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    elif path.suffix == ".zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_a_line_longer_than_max_line_bytes_is_a_reject_naming_file_line_and_length(
    tmp_path, suffix
):
    exact = b'{"text": "' + b"z" * (1000 - 12) + b'"}\n'  # 1000 bytes and its newline: kept
    f = write(tmp_path / f"in{suffix}", b'{"text": "a"}\n' + LONG + exact + b'{"text": "b"}')
    rejects = Rejects(tmp_path / "rejects.jsonl", LIMITS)
    got = [(n, o["text"][:1]) for n, o in iter_json_lines(f, rejects, ("text",))]
    rejects.close()
    assert got == [(1, "a"), (3, "z"), (4, "b")]
    (rec,) = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert rec == {
        "file": str(f),
        "line": 2,
        "reason": "line longer than max_line_bytes=1000",
        "raw": LONG[:64].decode(),
        "bytes": len(LONG),
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_dedup_rejects_a_too_long_line_as_clean_does(tmp_path, suffix):
    """dedup reads its input in its own blocks (data_pipeline.stages.dedup.blocks.line_tasks): the same
    line is refused with the same record, and the lines around it are kept."""
    docs = b"".join(
        b'{"text": "doc %d is unique enough", "id": "%d"}\n' % (i, i) for i in range(50)
    )
    f = write(tmp_path / f"in{suffix}", docs + LONG + docs.replace(b"doc", b"other"))
    keys = {"max_line_bytes": 1000, "reject_text_bytes": 64}
    clean = run(CleanConfig(input=str(f), output=str(tmp_path / "c.jsonl"), tasks=1, **keys))
    dedup = run_dedup(DedupConfig(input=str(f), output=str(tmp_path / "d.jsonl"), tasks=1, **keys))
    assert clean["rejects"] == dedup["rejects"]
    assert clean["rejects"]["by_file"] == {str(f): {"line longer than max_line_bytes=1000": 1}}
    want = (tmp_path / "c.jsonl.rejects.jsonl").read_text()
    assert (tmp_path / "d.jsonl.rejects.jsonl").read_text() == want
    assert json.loads(want)["line"] == 51
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 100


def test_rejects_file_keeps_max_rejects_records_of_reject_text_bytes_each(tmp_path):
    rejects = Rejects(tmp_path / "r.jsonl", InputLimits(max_rejects=3, reject_text_bytes=5))
    for i in range(1, 8):
        rejects.add("in.jsonl", i, "bad", b"0123456789\n")
    rejects.close()
    recs = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["line"], r["raw"], r["bytes"]) for r in recs] == [
        (i, "01234", 11) for i in (1, 2, 3)
    ]
    assert rejects.report() == {
        "total": 7,
        "not_written": 4,
        "by_file": {"in.jsonl": {"bad": 7}},
    }


@pytest.mark.parametrize("key, value", [("max_line_bytes", 0), ("max_rejects", -1)])
def test_a_bad_limit_is_refused_naming_its_key(tmp_path, key, value):
    f = write(tmp_path / "in.jsonl", b'{"text": "a"}\n')
    with pytest.raises(ValueError, match=rf"^{key} must be >= \d+, got {value}$"):
        run(CleanConfig(input=str(f), output=str(tmp_path / "o.jsonl"), **{key: value}))


@pytest.mark.slow
def test_half_a_million_invalid_lines_write_a_capped_rejects_file(tmp_path):
    """524,288 lines `x` (1 MiB): every one is counted, the first max_rejects=10,000 are
    written (~1.3 MB here instead of ~62 MB), and not_written says how many were not. (The cap
    is the same at any size past 10,000 lines; 8 MiB took ~45 s of the suite in clean's reject
    path, ~10 us a line.)"""
    lines = 1 << 20 >> 1
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"x\n" * lines)
    out = tmp_path / "o.jsonl"
    report = run(CleanConfig(input=str(f), output=str(out), tasks=1, progress=False))
    assert report["rejects"]["total"] == lines
    assert report["rejects"]["not_written"] == lines - 10_000
    rej = out.with_name(out.name + ".rejects.jsonl")
    recs = rej.read_text().splitlines()
    assert len(recs) == 10_000
    one = json.dumps(
        {
            "file": str(f),
            "line": lines,
            "reason": "invalid json (Expecting value)",
            "raw": "x\n",
            "bytes": 2,
        }  # fmt: skip
    )
    assert rej.stat().st_size <= 10_000 * (len(one) + 1)
    assert json.loads(recs[-1])["line"] == 10_000


_MEASURE = textwrap.dedent(
    """
    import resource, subprocess, sys
    rc = subprocess.run([sys.executable, "-m", "data_pipeline.clean", *sys.argv[1:]]).returncode
    print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    """
)


def make_bomb(path: Path, gib: int) -> None:
    """A .jsonl.zst whose first line decompresses to `gib` GiB, written in 1 MiB pieces by
    zstandard's streaming compressor (this process never holds more than one)."""
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as w:
        w.write(b'{"text": "')
        piece = b"a" * (1 << 20)
        for _ in range(gib << 10):
            w.write(piece)
        w.write(b'"}\n{"text": "after the bomb"}\n')


@pytest.mark.slow
def test_a_zstd_bomb_of_one_4_gib_line_is_refused_in_bounded_memory(tmp_path):
    """131 KB compressed, one 4 GiB line: the real clean stage (default max_line_bytes=64 MiB)
    rejects it, keeps the line after it, and peaked at 187,820 KiB RSS (measured here: the
    stage process and its children, ru_maxrss). With max_line_bytes=4294967296 a 1 GiB bomb
    peaked at 3,205,592 KiB: the line read whole."""
    bomb = tmp_path / "bomb.jsonl.zst"
    make_bomb(bomb, 4)
    assert bomb.stat().st_size < 1 << 20
    out = tmp_path / "out.jsonl"
    args = [f"input={bomb}", f"output={out}", "tasks=1", "progress=false"]
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=True
    )
    rc, peak_kib = map(int, proc.stdout.splitlines()[-1].split())  # after the stage's report
    assert rc == 3, proc.stderr  # finished, some lines rejected
    assert peak_kib < 400 << 10, f"peak RSS {peak_kib} KiB"
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["after the bomb"]
    (rec,) = [json.loads(x) for x in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
    assert (rec["line"], rec["bytes"]) == (1, 10 + (4 << 30) + 3)
    assert rec["reason"] == "line longer than max_line_bytes=67108864"
    assert rec["raw"] == '{"text": "' + "a" * (4096 - 10)


def test_a_rerun_with_another_max_line_bytes_reads_the_input_again(tmp_path):
    """The limit is part of the stage's work fingerprint: finished tasks of a run with another
    limit are not reused."""
    f = write(tmp_path / "in.jsonl", b'{"text": "a"}\n' + LONG)
    out = tmp_path / "o.jsonl"
    keep = {"tasks": 1, "keep_work": True}  # finished tasks stay, for the re-run to reuse
    first = run(CleanConfig(input=str(f), output=str(out), max_line_bytes=1000, **keep))
    assert first["rejects"]["total"] == 1 and len(out.read_text().splitlines()) == 1
    second = run(CleanConfig(input=str(f), output=str(out), **keep))
    assert second["rejects"]["total"] == 0 and len(out.read_text().splitlines()) == 2


def test_the_chain_passes_the_limits_to_its_stages(tmp_path):
    f = write(tmp_path / "in.jsonl", b'{"text": "a fine document"}\n{bad\n{bad\n' + LONG)
    cfg = ChainConfig(
        work_dir=str(tmp_path / "work"),
        sources=[CorpusConfig(name="s", input=str(f))],
        steps=["clean"],
        max_line_bytes=1000,
        max_rejects=2,
    )
    report = run_chain(cfg)
    counts = report["rejects"]["by_file"][str(f)]
    assert counts["line longer than max_line_bytes=1000"] == 1 and sum(counts.values()) == 3
    assert report["rejects"]["not_written"] == 1
