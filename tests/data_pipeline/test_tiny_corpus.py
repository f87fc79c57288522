"""The embedded tiny corpus: deterministic, correct in what it states, built once when several
processes ask for it at the same time. (Its build time is measured in benchmarks/, not here.)"""

from __future__ import annotations

import hashlib
import multiprocessing
import re
import sys

import pytest

from data_pipeline import shards
from data_pipeline.tiny_corpus import build_tiny_shards, number_word, tiny_documents
from data_pipeline.tokenizer import Tokenizer, TokenizerSpec


def test_number_words():
    assert [number_word(n) for n in (0, 7, 13, 20, 42, 99)] == [
        "zero",
        "seven",
        "thirteen",
        "twenty",
        "forty-two",
        "ninety-nine",
    ]


def test_every_arithmetic_sentence_is_true():
    value = {number_word(n): n for n in range(100)} | {
        number_word(n).capitalize(): n for n in range(100)
    }
    ops = {"plus": int.__add__, "minus": int.__sub__, "times": int.__mul__}
    pattern = re.compile(r"([A-Za-z-]+) (plus|minus|times) ([a-z-]+) is ([a-z-]+)\.")
    facts = [m for d in tiny_documents(num_docs=300) for m in pattern.findall(d["text"])]
    assert len(facts) > 300
    for a, op, b, c in facts:
        assert ops[op](value[a], value[b]) == value[c], (a, op, b, c)


def test_counting_runs_are_consecutive():
    value = {number_word(n): n for n in range(100)}
    runs = [
        [value[w.lower()] for w in m.split(", ")]
        for d in tiny_documents(num_docs=200)
        for m in re.findall(r"(?:[A-Za-z-]+, ){3,}[a-z-]+(?=\.)", d["text"])
    ]
    assert len(runs) > 100
    assert all(b == a + 1 for r in runs for a, b in zip(r, r[1:], strict=False))


def test_same_seed_same_documents_other_seed_other_documents():
    assert tiny_documents(seed=0, num_docs=50) == tiny_documents(seed=0, num_docs=50)
    assert tiny_documents(seed=1, num_docs=50) != tiny_documents(seed=0, num_docs=50)


def _digest(path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.iterdir())
        if p.suffix in (".tokens", ".index")
    }


def test_build_is_deterministic_and_a_few_megabytes(tmp_path, tiny_corpus_cache):
    """A build here gives the bytes of the session's build (another process, earlier)."""
    a = build_tiny_shards(tmp_path / "a")
    b = build_tiny_shards(tiny_corpus_cache / "tiny-corpus")
    assert b != a and _digest(a) == _digest(b)
    assert (tmp_path / "a" / "tiny-0.jsonl").read_bytes() == (
        tiny_corpus_cache / "tiny-corpus" / "tiny-0.jsonl"
    ).read_bytes()
    size = (tmp_path / "a" / "tiny-0.jsonl").stat().st_size
    assert 1_000_000 < size < 10_000_000
    m = shards.read_manifest(a)
    assert m["tokenizer"]["name"] == "gpt2"
    assert m["splits"]["train"]["num_tokens"] > 500_000
    assert m["splits"]["validation"]["num_documents"] > 20
    shards.verify(a)


def test_shards_decode_to_the_generated_text_and_a_rebuild_reuses_them(tiny_corpus_cache):
    built = tiny_corpus_cache / "tiny-corpus"
    out = built / "tokens"
    before = _digest(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert build_tiny_shards(built) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # skipped
    assert _digest(out) == before
    tok = Tokenizer(TokenizerSpec("gpt2"))
    first = tok.decode(next(shards.iter_documents(out, "train")))
    assert re.fullmatch(r"[A-Za-z ,.\-]+", first) and first.endswith(".")


def _build_and_report(out_dir: str, queue) -> None:
    """Build, and report the chain steps this process ran (the real chain's own report; a
    process that reused another's shards ran none) and whether numba got imported (a rank
    that reuses the shards checks the dedup step without loading its kernels)."""
    import data_pipeline.chain as chain

    ran: list[str] = []
    real_run = chain.run

    def run_and_record(cfg):
        report = real_run(cfg)
        ran.extend(report["ran"])
        return report

    chain.run = run_and_record  # build_tiny_shards imports chain.run when called
    try:
        queue.put(("ok", str(build_tiny_shards(out_dir)), ran, "numba" in sys.modules))
    except BaseException as e:  # reported to the test, which fails with it
        queue.put(("error", repr(e), ran, None))


@pytest.mark.slow
def test_processes_building_at_once_build_once_and_agree(tmp_path):
    """As the ranks of `torchrun train.py` do on a fresh cache: the first holds the build lock,
    the others wait and then reuse its shards (before the lock, the second rank's rename of its
    temporary corpus file failed with FileNotFoundError)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_and_report, args=(str(tmp_path), queue)) for _ in range(3)]
    try:
        for p in procs:
            p.start()
        results = [queue.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            p.kill()
            p.join()
    assert [r[0] for r in results] == ["ok"] * 3, results
    assert len({r[1] for r in results}) == 1
    # One build: one process ran the chain's steps, the two that waited ran none.
    steps = ["ingest:tiny", "clean:tiny", "dedup:all", "tokenize:tokens"]
    # ... and the builder compiled with numba; the two that reused the shards never imported it.
    got = sorted((r[2], r[3]) for r in results)
    assert got == [([], False), ([], False), (steps, True)], results
    out = build_tiny_shards(tmp_path)
    assert str(out) == results[0][1]
    shards.verify(out)
    # one corpus file, no temporary left behind by a writer that lost a race
    assert sorted(p.name for p in tmp_path.glob("tiny-0.jsonl*")) == ["tiny-0.jsonl"]
