"""The dedup stage: recall-first banding, exact verification, one document kept per cluster,
bad input counted, restart after a kill. The quality test plants near-duplicates into real
English text (CPython's pydoc topics and the standard library's docstrings, both present
wherever Python is) and measures against exact word-5-gram Jaccard computed here."""

from __future__ import annotations

import ast
import gzip
import json
import os
import pydoc_data.topics
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from datasketch.lsh import _optimal_param

from data_pipeline.documents import Rejects, iter_json_lines
from data_pipeline.kernels import lsh
from data_pipeline.runtime.scaleout import completed
from data_pipeline.stages.dedup import DedupConfig, candidate_probability, choose_banding, run
from data_pipeline.stages.dedup.buckets import _bucket_pairs
from tests.data_pipeline.test_reddit import parts_bytes

from .conftest import assert_no_stage_processes

REPO = Path(__file__).resolve().parents[2]


# --- real text and exact ground truth ------------------------------------------------------


def real_words() -> list[str]:
    """~200k words of English: pydoc topics, then stdlib module/class/function docstrings."""
    words = " ".join(t for _, t in sorted(pydoc_data.topics.topics.items())).split()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        for node in ast.walk(tree):
            if isinstance(node, kinds) and (doc := ast.get_docstring(node)):
                words.extend(doc.split())
    return words


def shingle_set(text: str, n: int = 5) -> set[str]:
    w = text.split()
    return {" ".join(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))}


def max_jaccard_and_pairs(texts: list[str], floor: float):
    """Exact Jaccard of every pair sharing a shingle (inverted index): each document's
    maximum over the others, and the pairs at or above `floor`."""
    sets = [shingle_set(t) for t in texts]
    index = defaultdict(list)
    for i, s in enumerate(sets):
        for g in s:
            index[g].append(i)
    shared = defaultdict(int)
    for docs in index.values():
        if len(docs) > 50:  # a boilerplate phrase: the pairs it links are counted below
            continue
        for x in range(len(docs)):
            for y in range(x + 1, len(docs)):
                shared[docs[x], docs[y]] += 1
    best = np.zeros(len(texts))
    pairs = []
    for (i, j), _ in shared.items():
        inter = len(sets[i] & sets[j])
        jac = inter / (len(sets[i]) + len(sets[j]) - inter)
        best[i], best[j] = max(best[i], jac), max(best[j], jac)
        if jac >= floor:
            pairs.append((i, j, jac))
    return best, pairs


def perturb(words: list[str], rng: random.Random, subs: int = 0, trim: int = 0) -> list[str]:
    w = list(words[: len(words) - trim])
    for pos in rng.sample(range(len(w)), subs):
        w[pos] = f"planted{rng.randrange(10**6)}"
    return w


def write_jsonl(path: Path, docs: list[dict], extra_lines: list[str] = ()) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def read_out(path: Path) -> list[dict]:
    return [obj for _, obj in iter_json_lines(path, Rejects(None))]


def cfg(**kw) -> DedupConfig:
    c = DedupConfig(input=kw.pop("input"), output=kw.pop("output"))
    c.progress = False
    for k, v in kw.items():
        setattr(c, k, v)
    return c


# --- banding -------------------------------------------------------------------------------


def test_datasketch_optimal_banding_misses_most_pairs_at_the_threshold():
    """The trap this stage avoids, in numbers: datasketch's 'optimal' 3 x 42 for 0.95."""
    b, r = _optimal_param(0.95, 128, 0.5, 0.5)
    assert candidate_probability(0.95, b, r) < 0.35


def test_default_banding_makes_a_j090_pair_a_candidate_almost_surely():
    bands, rows = choose_banding(128, 0.90, 0.9999)
    assert bands * rows <= 128
    assert candidate_probability(0.90, bands, rows) >= 0.9999
    assert candidate_probability(0.90, 128 // (rows + 1), rows + 1) < 0.9999  # most selective
    assert (bands, rows) == (18, 7)


def test_bucket_pairs_cover_small_buckets_fully_and_chain_large_ones():
    keys = np.array([5, 9, 5, 7, 5, 9] + [3] * 40, dtype=np.uint64)
    pairs = {tuple(p) for p in _bucket_pairs(keys, window=4).tolist()}
    assert {(0, 2), (0, 4), (2, 4), (1, 5)} <= pairs
    assert all(i < j for i, j in pairs)
    big = [(i, j) for i, j in pairs if i >= 6]
    assert all(0 < j - i <= 4 for i, j in big)  # a window, not all 780 pairs
    assert {i for p in big for i in p} == set(range(6, 46))  # but every member linked


def test_only_documents_sharing_a_key_are_bucketed():
    """_bucket_pairs sorts only the documents whose key occurs again (found with a hash
    table); the table must find exactly those, colliding slots included."""
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 2**63, 5000).astype(np.uint64)
    keys[100:200] = keys[200:300]  # repeated keys
    keys[4000] = keys[17] + np.uint64(1 << 40)  # same low bits (table slot), another key
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    assert np.array_equal(lsh.shared_keys(keys), np.flatnonzero(counts[inverse] > 1))


def test_compiled_band_keys_equal_the_numpy_reference():
    """Keys only need to be equal for equal bands, but a resumed run may mix key files made
    with and without numba, so the two implementations must agree bit for bit."""
    sig = np.random.default_rng(0).integers(0, 2**32, (500, 128), dtype=np.uint64)
    sig = sig.astype(np.uint32)
    sig[7] = sig[3]  # equal signatures, equal keys in every band
    keys = lsh.band_keys(sig, 7, 18)
    assert np.array_equal(keys, lsh.band_keys_numpy(sig, 7, 18))
    assert np.array_equal(keys[7], keys[3]) and (keys[7] != keys[4]).all()


def test_compiled_set_jaccard_equals_the_numpy_reference():
    """Repeated hashes within a document count once, two empty documents are identical
    (J = 1, as datasketch's empty MinHashes are), and the value is the exact fraction."""
    rng = np.random.default_rng(1)
    lens = rng.integers(0, 300, 200)
    lens[:2] = 0
    offs = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offs[1:])
    hashes = rng.integers(0, 400, offs[-1]).astype(np.uint32)  # many repeats and overlaps
    ia = np.concatenate(([0, 0, 9], rng.integers(0, 200, 500)))
    ib = np.concatenate(([1, 5, 4], rng.integers(0, 200, 500)))
    got, want = np.empty(len(ia)), np.empty(len(ia))
    lsh.set_jaccard_kernel(lsh.sort_each(hashes.copy(), offs), offs, ia, ib, got)
    lsh.set_jaccard_numpy(hashes, offs, ia, ib, want)
    assert np.array_equal(got, want)
    assert got[0] == 1.0 and got[1] == 0.0
    a, b = set(hashes[offs[9] : offs[10]].tolist()), set(hashes[offs[4] : offs[5]].tolist())
    assert 0 < got[2] < 1 and got[2] == len(a & b) / len(a | b)


# --- quality acceptance --------------------------------------------------------------------


@pytest.mark.slow
def test_quality_recall_of_j097_pairs_and_keep_rate_of_unique_docs(tmp_path):
    """Acceptance: recall >= 0.99 of pairs with word-5-gram Jaccard >= 0.97 (at most one of
    the two survives) and >= 0.995 of documents without a near-duplicate (max J < 0.85)
    kept, on real text with planted near-duplicates at known exact Jaccard."""
    rng = random.Random(1234)
    words = real_words()
    base = [words[i : i + 400] for i in range(0, len(words) - 400, 400)]
    docs = [" ".join(w) for w in base]
    plants = []
    for k, src in enumerate(rng.sample(range(len(base)), 160)):
        kind = k % 8
        if kind == 0:
            w = base[src]  # exact copy
        elif kind in (1, 2, 3):
            w = perturb(base[src], rng, subs=1)  # J ~ 0.975
        elif kind in (4, 5):
            w = perturb(base[src], rng, trim=rng.randint(1, 6))  # J >= 0.985
        elif kind == 6:
            w = perturb(base[src], rng, subs=2)  # J ~ 0.95: either side of the threshold
        else:
            w = perturb(base[src], rng, subs=8)  # J ~ 0.82: similar, not a duplicate
        plants.append(" ".join(w))
    texts = docs + plants
    order = list(range(len(texts)))
    rng.shuffle(order)
    texts = [texts[i] for i in order]
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)])

    report = run(cfg(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl")))
    kept = {d["id"] for d in read_out(tmp_path / "out.jsonl")}

    best, pairs = max_jaccard_and_pairs(texts, floor=0.97)
    assert len(pairs) >= 100, "the planted pairs must be there"
    caught = [not (f"d{i}" in kept and f"d{j}" in kept) for i, j, _ in pairs]
    recall = sum(caught) / len(pairs)
    unique = [i for i in range(len(texts)) if best[i] < 0.85]
    keep_rate = sum(f"d{i}" in kept for i in unique) / len(unique)
    assert len(unique) >= 300
    print(f"recall {recall:.4f} ({len(pairs)} pairs), kept {keep_rate:.4f} ({len(unique)})")
    assert recall >= 0.99, f"recall {recall:.4f} of {len(pairs)} pairs with J >= 0.97"
    assert keep_rate >= 0.995, f"kept {keep_rate:.4f} of {len(unique)} unique documents"
    assert report["docs_in"] == len(texts)
    assert report["docs_out"] == len(kept)
    # exact copies (kind 0) are removed by the exact pass, before any pair is verified
    assert report["verified_pairs"] + report["exact_duplicates"] >= len(pairs)
    assert report["exact_duplicates"] >= 1
    assert report["largest_cluster"] >= 2
    assert all(e["jaccard"] >= 0.95 for e in report["examples"])
    assert all(e["jaccard"] < 0.95 for e in report["closest_rejected"])


# --- the stage as a command ----------------------------------------------------------------


def small_corpus() -> list[dict]:
    words = " ".join(t for _, t in sorted(pydoc_data.topics.topics.items())).split()
    docs = [
        {"id": f"doc{i}", "text": " ".join(words[k : k + 300]), "meta": {"src": "pydoc"}}
        for i, k in enumerate(range(0, 30000, 300))
    ]
    dup = dict(docs[3], id="doc3-copy")
    near = dict(docs[7], id="doc7-near", text=docs[7]["text"] + " one more word")
    return [dup] + docs + [near]  # the copy comes FIRST: it is the one kept


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.dedup", *args, "progress=false"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_keeps_first_of_each_cluster_counts_rejects_and_exits_3(tmp_path):
    docs = small_corpus()
    bad = ['{"text": ', '{"id": "no-text"}', '{"text": ""}', '["not", "an object"]']
    bad.append('{"id": "lone", "text": "a lone surrogate \\ud800 cannot be UTF-8"}')
    write_jsonl(tmp_path / "a.jsonl", docs[:50], bad[:2])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for d in docs[50:]:
            f.write(json.dumps(d) + "\n")
        f.write("\n".join(bad[2:]) + "\n")
    out = tmp_path / "out" / "dedup.jsonl.zst"
    proc = run_cli(f"input={tmp_path}", f"output={out}", "workers=2")
    assert proc.returncode == 3, proc.stderr
    got = read_out(out)
    ids = [d["id"] for d in got]
    assert "doc3-copy" in ids and "doc3" not in ids  # first in input order wins
    assert "doc7" in ids and "doc7-near" not in ids
    assert ids == [d["id"] for d in docs if d["id"] not in ("doc3", "doc7-near")]
    assert got[1] == docs[1]  # documents pass through unchanged, meta included
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert (report["docs_in"], report["docs_out"], report["clusters"]) == (102, 100, 1)
    assert (report["exact_duplicates"], report["near_duplicates"]) == (1, 1)  # doc3, doc7-near
    assert report["rejects"]["total"] == 5
    rejects = [json.loads(x) for x in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 5
    assert {r["file"].rsplit("/", 1)[1] for r in rejects} == {"a.jsonl", "b.jsonl.gz"}
    assert any("UTF-8" in r["reason"] for r in rejects)
    assert not Path(f"{out}.dedup-work").exists()  # removed after success


def split_corpus(tmp_path: Path) -> Path:
    """1,020 documents over four files, near-duplicates across files (so clusters span
    tasks) and bad lines in two of them."""
    docs = small_corpus() * 10
    for i, d in enumerate(docs):
        docs[i] = dict(d, id=f"{d['id']}#{i}")
    d = tmp_path / "in"
    d.mkdir()
    for k in range(4):
        bad = ["{not json", '{"text": ""}'] if k in (1, 3) else []
        write_jsonl(d / f"part{k}.jsonl", docs[k * 255 : (k + 1) * 255], bad)
    return d


def test_four_tasks_on_two_workers_give_one_tasks_bytes_rejects_and_counts(tmp_path):
    inp = split_corpus(tmp_path)
    one = run(cfg(input=str(inp), output=str(tmp_path / "one.jsonl"), tasks=1))
    four = run(cfg(input=str(inp), output=str(tmp_path / "four"), tasks=4, workers=2))
    assert one["tasks"]["signatures"] == 1
    assert four["tasks"] == {"signatures": 4, "exact": 1, "buckets": 4, "clusters": 1, "filter": 4}
    assert parts_bytes(tmp_path / "four") == (tmp_path / "one.jsonl").read_bytes()
    assert four["docs_removed"] > 255  # copies of the first file's documents in the others
    for k in ("docs_in", "docs_out", "candidate_pairs", "verified_pairs", "clusters", "rejects"):
        assert four[k] == one[k], k
    assert four["rejects"]["total"] == 4
    assert (tmp_path / "four.rejects.jsonl").read_bytes() == (
        tmp_path / "one.jsonl.rejects.jsonl"
    ).read_bytes()


@pytest.mark.slow  # a Ray actor per task: seconds of start-up each
def test_two_tasks_on_ray_give_the_local_runs_bytes_rejects_and_counts(tmp_path, local_ray):
    """Each task is a Ray actor, a process of its own: two per split step show the split (four
    are split locally, test_four_tasks_on_two_workers_give_one_tasks_bytes_rejects_and_counts)."""
    import ray

    # The Ray started here listens on the loopback address only (docs/data-pipeline.md).
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    inp = split_corpus(tmp_path)
    local = run(cfg(input=str(inp), output=str(tmp_path / "local.jsonl"), tasks=1))
    on_ray = run(cfg(input=str(inp), output=str(tmp_path / "ray"), tasks=2, executor="ray"))
    want = {"signatures": 2, "exact": 1, "buckets": 2, "clusters": 1, "filter": 2}
    assert on_ray["tasks"] == want
    assert parts_bytes(tmp_path / "ray") == (tmp_path / "local.jsonl").read_bytes()
    for k in ("docs_in", "docs_out", "candidate_pairs", "verified_pairs", "clusters", "rejects"):
        assert on_ray[k] == local[k], k
    assert on_ray["exact_duplicates"] == local["exact_duplicates"] > 0
    assert (tmp_path / "ray.rejects.jsonl").read_bytes() == (
        tmp_path / "local.jsonl.rejects.jsonl"
    ).read_bytes()
    steps = {"signatures", "exact", "buckets", "clusters", "filter", "report"}
    assert set(on_ray["step_seconds"]) == steps


@pytest.mark.slow
@pytest.mark.parametrize("step", ["signatures", "buckets", "clusters", "filter"])
def test_a_run_killed_during_each_step_reruns_to_the_same_bytes(tmp_path, step):
    """SIGKILL of the whole run (tasks=3, workers=1) after `step` started and before all its
    tasks completed: no output, and the re-run, which redoes only unfinished tasks, writes the
    bytes of an uninterrupted run."""
    inp = split_corpus(tmp_path)
    ref = tmp_path / "ref.jsonl"
    run(cfg(input=str(inp), output=str(ref), tasks=3))
    out = tmp_path / "out.jsonl"
    work = Path(f"{out}.dedup-work")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "data_pipeline.dedup", f"input={inp}", f"output={out}"]
    cmd += ["progress=false", "batch_bytes=4096", "tasks=3", "workers=1"]
    started = work / "executor" / step / "executor.json"
    counts = {"signatures": 3, "exact": 1, "buckets": 3, "clusters": 1, "filter": 3}
    for _attempt in range(5):  # a step of a few ms can finish between two polls
        shutil.rmtree(work, ignore_errors=True)
        proc = subprocess.Popen(
            [*cmd, "keep_work=true"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not started.exists():
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its processes must follow it
        proc.wait()
        assert_no_stage_processes(proc.pid)
        if started.exists() and not completed(work, step, counts[step]):
            break
    assert started.exists() and not completed(work, step, counts[step]), "never killed mid-step"
    assert not out.exists()  # never a file that looks complete
    before = [s for s in counts if completed(work, s, counts[s])]
    report = run(cfg(input=str(inp), output=str(out), tasks=3, keep_work=True))
    assert out.read_bytes() == ref.read_bytes()
    assert report["resumed_stages"] == [s for s in before if s != "filter"]
    # and a second re-run resumes every stage from the work directory
    out.unlink()
    report = run(cfg(input=str(inp), output=str(out), tasks=3, keep_work=True))
    assert report["resumed_stages"] == ["signatures", "exact", "buckets", "clusters"]
    assert out.read_bytes() == ref.read_bytes()


def test_changed_input_is_rehashed_not_resumed(tmp_path):
    docs = small_corpus()[:20]
    write_jsonl(tmp_path / "in.jsonl", docs)
    c = cfg(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o.jsonl"), workers=1)
    c.keep_work = True
    assert run(c)["docs_out"] == 19
    write_jsonl(tmp_path / "in.jsonl", docs[1:])  # the input changes: size and mtime
    report = run(c)
    assert report["resumed_stages"] == []
    assert (report["docs_in"], report["docs_out"]) == (19, 19)


def test_resumed_run_with_another_banding_keys_the_signatures_again(tmp_path):
    """The signature pass writes band keys for the banding of its run; a re-run with other
    bands x rows resumes the signatures but must not bucket the old keys."""
    docs = small_corpus()
    write_jsonl(tmp_path / "in.jsonl", docs)
    first = cfg(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "a.jsonl"), workers=1)
    first.keep_work, first.work_dir = True, str(tmp_path / "work")
    run(first)
    second = cfg(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "b.jsonl"), workers=1)
    second.keep_work, second.work_dir = True, str(tmp_path / "work")
    second.bands, second.rows = 32, 4
    report = run(second)
    assert report["resumed_stages"] == ["signatures", "exact"]
    fresh = cfg(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "c.jsonl"), workers=1)
    fresh.bands, fresh.rows = 32, 4
    want = run(fresh)
    assert report["candidate_pairs"] == want["candidate_pairs"]
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()


def test_zstd_spool_gives_the_same_output_as_the_plain_one(tmp_path):
    docs = small_corpus()
    write_jsonl(tmp_path / "in.jsonl", docs)
    outs = []
    for spool in ("plain", "zstd"):
        c = cfg(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / f"{spool}.jsonl"))
        c.spool, c.batch_bytes = spool, 8192  # several segments
        assert run(c)["docs_out"] == 100
        outs.append((tmp_path / f"{spool}.jsonl").read_bytes())
    assert outs[0] == outs[1]


def test_signature_verification_mode_and_explicit_banding(tmp_path):
    docs = small_corpus()
    write_jsonl(tmp_path / "in.jsonl", docs)
    c = cfg(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o.jsonl"), workers=1)
    c.verify, c.bands, c.rows = "signature", 32, 4
    report = run(c)
    assert report["banding"]["bands"] == 32 and report["banding"]["rows"] == 4
    assert report["docs_out"] == 100
    assert report["prefiltered_pairs"] == 0


def test_input_with_only_rejects_gives_an_empty_output_and_counts_them(tmp_path):
    (tmp_path / "in.jsonl").write_text('not json\n{"text": ""}\n{"id": 1}\n')
    report = run(cfg(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o.jsonl")))
    assert (report["docs_in"], report["docs_out"], report["rejects"]["total"]) == (0, 0, 3)
    assert (tmp_path / "o.jsonl").read_text() == ""
    assert len((tmp_path / "o.jsonl.rejects.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
@pytest.mark.parametrize("truncate", [False, True])
def test_workers_read_the_input_exactly_as_io_read_documents(tmp_path, suffix, truncate):
    """The signature pass hands workers blocks of bytes cut at any line boundary; documents,
    default ids, rejects (reason, line, raw text) and the truncation reject must be those of
    io.read_documents, with any block size."""
    import zstandard

    from data_pipeline.documents import read_documents

    lines = [
        json.dumps(
            {"text": f"start{i} " + " ".join(f"w{i}.{k}" for k in range(i % 9)), "id": f"d{i}"}
        )
        for i in range(60)
    ]
    lines[3] = '{"text": "no id here, so file:line becomes the id"}'
    lines[7] = "{not json"
    lines[11] = ""
    lines[12] = "   \r"
    lines[17] = '{"text": ""}'
    lines[23] = "[1, 2]"
    lines[29] = '{"id": "no text"}'
    lines[31] = '{"text": 5}'
    data = (
        "\n".join(lines) + "\n"
    ).encode() + b'{"text": "bad \xff byte"}\n{"text": "last, no newline"}'
    path = tmp_path / f"in{suffix}"
    if suffix.endswith(".gz"):
        payload = gzip.compress(data)
    elif suffix.endswith(".zst"):
        payload = zstandard.ZstdCompressor().compress(data)
    else:
        payload = data
    if truncate and suffix != ".jsonl":
        payload = payload[: len(payload) * 2 // 3]
    path.write_bytes(payload)

    want_rejects = Rejects(tmp_path / "want.rejects.jsonl")
    want = [dict(d) for d in read_documents(path, want_rejects)]
    want_rejects.close()
    want_text = (tmp_path / "want.rejects.jsonl").read_text()
    assert ("truncated" in want_text) == (truncate and suffix != ".jsonl")
    for batch_bytes in (1, 97, 1 << 20):
        out = tmp_path / f"out{batch_bytes}.jsonl"
        report = run(cfg(input=str(path), output=str(out), workers=1, batch_bytes=batch_bytes))
        got = [json.loads(x) for x in out.read_text().splitlines()]
        assert got == want  # no two documents are alike, so all are kept
        assert report["docs_in"] == len(want)
        assert Path(f"{out}.rejects.jsonl").read_text() == want_text


def test_buckets_split_by_key_range_give_the_same_bytes_and_hold_a_share_of_the_keys(tmp_path):
    inp = split_corpus(tmp_path)
    one = run(cfg(input=str(inp), output=str(tmp_path / "one.jsonl"), tasks=2, key_ranges=1))
    work = tmp_path / "work"
    three = run(
        cfg(input=str(inp), output=str(tmp_path / "three.jsonl"), tasks=2, key_ranges=3,
            work_dir=str(work), keep_work=True)
    )  # fmt: skip
    assert (one["tasks"]["buckets"], three["tasks"]["buckets"]) == (2, 6)
    assert (tmp_path / "three.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    for k in ("docs_out", "candidate_pairs", "verified_pairs", "clusters"):
        assert three[k] == one[k], k
    assert one["candidate_pairs"] > 0
    private = work / "opt-train-dedup.work"  # work_dir= is the parent of the stage's own
    held = [json.loads((private / "buckets" / f"task-{t:05d}.json").read_text())["keys_held"]
            for t in range(6)]  # fmt: skip
    # At most, over its bands, each range task held about a third of a band's keys (uniform
    # hashes; this corpus's copies share keys, so a range's count is lumpy), never all.
    assert 0 < min(held) and max(held) < 0.6 * three["docs_in"], held
