"""Batch provenance (opt_train/data/provenance.py, `python -m opt_train.provenance`): the
documents behind a step, computed from the loader's order, on the garbage-document corpus of
the spike tests (tests/opt_train/garbage.py). The one-process spike after a resume is checked
on the goodput test's killed-and-resumed run (tests/opt_train/test_goodput.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.shards import read_manifest
from opt_train.data.loader import GlobalOrderLoader, PackedWindows, Source
from opt_train.data.provenance import compact, step_documents, step_start, window_spans
from opt_train.tools.provenance import main as provenance_main
from tests.opt_train.garbage import SEQ, garbage_steps, rows

REPO = Path(__file__).resolve().parents[2]


def garbage_docs(data: Path) -> dict[int, str]:
    """Shard 0's document number -> text of the corpus's garbage documents (every document is
    in train, in input order, in one shard: checked)."""
    assert len(read_manifest(data)["splits"]["train"]["shards"]) == 1
    docs = [json.loads(x) for x in (data.parent / "docs.jsonl").read_text().splitlines()]
    return {i: d["text"] for i, d in enumerate(docs) if d["id"].startswith("garbage")}


def span_tokens(windows: PackedWindows, shard: int, doc: int, a: int, b: int) -> np.ndarray:
    r = windows.reader
    first = int(r.starts[shard] + r.indexes[shard][doc])
    return r.read(first + a, b - a)


def test_a_window_is_exactly_the_document_parts_it_lists(garbage_corpus):
    data, bad = garbage_corpus
    windows = PackedWindows(data, "train", SEQ)
    eos = read_manifest(data)["eos_id"]
    for w in sorted({*range(0, 40), *bad, len(windows) - 1}):
        spans = window_spans(windows, w)
        parts = [span_tokens(windows, s, d, a, b) for s, d, _, a, b, _ in spans]
        assert np.array_equal(np.concatenate(parts), windows.window(w)), w
        assert [o for *_, o in spans] == np.cumsum([0, *map(len, parts[:-1])]).tolist()
        for (_, _, n, _, b, _), part in zip(spans, parts, strict=True):
            if b == n + 1:  # the window holds the separator after the document
                assert part[-1] == eos
        # Every span after the first starts a document; every one but the last ends one.
        assert all(a == 0 for _, _, _, a, _, _ in spans[1:])
        assert all(b == n + 1 for _, _, n, _, b, _ in spans[:-1])
    # A garbage window names a garbage document.
    garbage = garbage_docs(data)
    for w in bad:
        assert {d for _, d, *_ in window_spans(windows, w)} & set(garbage), w


def test_step_start_is_the_batch_the_loader_reads_under_skip_ranges(garbage_corpus):
    data, _ = garbage_corpus
    skips = [(3, 4), (4, 6), (10, 10), (20, 22)]
    loader = GlobalOrderLoader(PackedWindows(data, "train", SEQ), 5, 4, 1, skip_steps=skips)
    for step in range(1, 25):
        loader.next_step()
        assert step_start(loader, step) == loader.samples_seen - 4, step


def test_two_ranks_read_the_world_one_documents_split_by_rank(garbage_corpus):
    """The union over ranks at world 2 is the world-1 answer, and each rank's share is what
    that rank's own loader reads (its tokens, compared)."""
    data, _ = garbage_corpus
    windows = PackedWindows(data, "train", SEQ)
    ranks = [GlobalOrderLoader(windows, 21, 4, 1, rank=r, world=2) for r in range(2)]
    for step in range(1, 13):
        one = step_documents(ranks[0], step, world=1)
        two = step_documents(ranks[0], step, world=2)
        assert [(s.sample, s.doc, s.start, s.end) for s in one] == [
            (s.sample, s.doc, s.start, s.end) for s in two
        ]
        for r, loader in enumerate(ranks):
            mine = step_documents(loader, step, rank=r)
            assert {s.rank for s in mine} == {r}
            read = np.concatenate(
                [np.concatenate([x.numpy(), y[:, -1:].numpy()], 1) for x, y in loader.next_step()]
            )
            for row, sample in zip(read, sorted({s.sample for s in mine}), strict=True):
                parts = [
                    span_tokens(windows, s.shard, s.doc, s.start, s.end)
                    for s in mine
                    if s.sample == sample
                ]
                assert np.array_equal(np.concatenate(parts), row), (step, r)


def test_a_mixtures_windows_name_their_source(garbage_corpus, tmp_path):
    """Two sources (the corpus under two names, so their windows differ only by name and
    order): each listed document part is the tokens the loader gave that sample."""
    data, _ = garbage_corpus
    sources = [Source(n, PackedWindows(data, "train", SEQ), w) for n, w in (("a", 3), ("b", 1))]
    loader = GlobalOrderLoader(sources, 3, 8, 1)
    named = set()
    for step in range(1, 4):
        spans = step_documents(loader, step)
        rows = np.concatenate(
            [np.concatenate([x.numpy(), y[:, -1:].numpy()], 1) for x, y in loader.next_step()]
        )
        for row, sample in zip(rows, sorted({s.sample for s in spans}), strict=True):
            mine = [s for s in spans if s.sample == sample]
            named |= {s.source for s in mine}
            parts = [span_tokens(sources[0].windows, s.shard, s.doc, s.start, s.end) for s in mine]
            assert np.array_equal(np.concatenate(parts), row), (step, sample)
    assert named == {"a", "b"}


def test_the_cli_refuses_bad_arguments_naming_them(tmp_path):
    with pytest.raises(SystemExit, match="step=N is required"):
        provenance_main([str(tmp_path)])
    with pytest.raises(SystemExit, match="'stp=3': expected one of step="):
        provenance_main([str(tmp_path), "stp=3"])
    with pytest.raises(SystemExit, match="step=x: expected an integer"):
        provenance_main([str(tmp_path), "step=x"])
    with pytest.raises(SystemExit, match="config.yaml: no such file"):
        provenance_main([str(tmp_path), "step=3"])


@pytest.mark.slow
@pytest.mark.multirank
def test_a_two_rank_spike_row_names_the_garbage_documents_and_the_cli_prints_them(
    garbage_corpus, two_rank_rollback, capsys
):
    """The rows a real 2-rank run wrote (the stability tests' run, reused) name the documents
    the world-1 order gives for the step, the garbage one among them; the CLI prints its text,
    and its answer for a step is the same at world 1 and world 2."""
    data, bad = garbage_corpus
    assert garbage_steps(data, bad, 21, 2, 45) == [23]
    run = two_rank_rollback("parallel.dp_shard=2")
    spike = next(r for r in rows(run) if r.get("event") == "spike")
    rollback = next(r for r in rows(run) if r.get("event") == "rollback")
    assert spike["step"] == 23
    world_one = GlobalOrderLoader(PackedWindows(data, "train", SEQ), 21, 2, 1)
    expected = compact(step_documents(world_one, 23))
    assert spike["documents"] == rollback["documents"] == json.loads(json.dumps(expected))
    garbage = garbage_docs(data)
    named = [d for _, _, d in spike["documents"] if d in garbage]
    assert named, spike["documents"]

    out = subprocess.run(
        [sys.executable, "-m", "opt_train.provenance", str(run), "step=23"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "over 2 data-parallel rank(s)" in out.stdout
    assert "spike at step 23" in out.stdout
    for d in named:
        assert f"document {d}" in out.stdout
        assert garbage[d][:200] in out.stdout  # decoded by the data's tokenizer
    # Step 23 as the run trained it in the end (after the skip): the same at world 1 and 2.
    one, two = (_cli_json(capsys, run, "step=23", f"world={w}") for w in (1, 2))
    key = [(d["sample"], d["shard"], d["doc"], d["start"], d["end"]) for d in one["documents"]]
    assert key == [
        (d["sample"], d["shard"], d["doc"], d["start"], d["end"]) for d in two["documents"]
    ]
    assert {d["rank"] for d in two["documents"]} == {0, 1}
    assert [s["documents"] for s in one["spikes"]] == [s["documents"] for s in two["spikes"]]
    second = _cli_json(capsys, run, "step=23", "rank=1")
    assert second["documents"] == [d for d in two["documents"] if d["rank"] == 1]
    # ... which is a batch past the skipped ones: original step 26's.
    assert rollback["data_skip_steps"] == [[21, 23]]
    assert {d["sample"] for d in one["documents"]} == {2 * 25, 2 * 25 + 1}


def _cli_json(capsys, run: Path, *args: str) -> dict:
    capsys.readouterr()
    provenance_main([str(run), *args, "format=json"])
    return json.loads(capsys.readouterr().out)
