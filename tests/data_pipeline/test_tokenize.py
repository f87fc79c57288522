"""The tokenize stage: documents in, token shards out, exactly as the tokenizer encodes them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import shards
from data_pipeline.files import sha256_file
from data_pipeline.stages.tokenize import (
    TokenizeConfig,
    TokenizerConfig,
    is_validation,
    run,
    train_copies,
)
from data_pipeline.tokenizer import Tokenizer, TokenizerSpec, gpt2_files_dir

from .conftest import assert_no_stage_processes

REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "numbers 1 22 333 4444, contractions don't we'll, emoji 🎉👍🏽 and 你好",
    "  whitespace\t\truns\n\n\n  and trailing   ",
    "A longer document. " * 400,
]


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


def corpus(n: int, prefix: str = "d") -> list[dict]:
    return [
        {"text": f"{TEXTS[i % len(TEXTS)]} #{i}", "id": f"{prefix}{i}", "meta": {}}
        for i in range(n)
    ]


def tokenize(tmp_path: Path, docs_or_input, name: str = "out", **kw) -> tuple[Path, dict]:
    inp = docs_or_input
    if isinstance(docs_or_input, list):
        inp = str(write_jsonl(tmp_path / f"{name}.jsonl", docs_or_input))
    out = tmp_path / name
    report = run(TokenizeConfig(input=inp, output=str(out), **kw))
    return out, report


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.tokenize", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_shards_hold_each_document_as_the_tokenizer_encodes_it_in_input_order(
    tmp_path, name, opt_tokenizer_dir
):
    path = str(opt_tokenizer_dir) if name == "opt" else None
    docs = corpus(60)
    out, report = tokenize(
        tmp_path, docs, tokenizer=TokenizerConfig(name, path), validation_fraction=0.3
    )
    tok = Tokenizer(TokenizerSpec(name, path))
    for split in ("train", "validation"):
        expected = [
            tok.encode(d["text"]).tolist()
            for d in docs
            if (split == "validation") == is_validation(d["id"], 0.3, 0)
        ]
        got = [a.tolist() for a in shards.iter_documents(out, split)]
        assert got == expected and len(got) > 5
    assert report["documents_in"] == 60
    assert report["rejects"]["total"] == 0


def test_every_document_is_followed_by_the_separator_in_the_token_file(tmp_path):
    out, _ = tokenize(tmp_path, corpus(20), validation_fraction=0.0)
    manifest = shards.read_manifest(out)
    shard = manifest["splits"]["train"]["shards"][0]
    tokens = np.fromfile(out / shard["tokens"], dtype=np.uint16)
    index = np.fromfile(out / shard["index"], dtype=np.int64)
    assert len(index) == 21 and index[0] == 0 and index[-1] == len(tokens)
    assert (tokens[index[1:] - 1] == 50256).all()
    assert (tokens == 50256).sum() == 20  # and nowhere else


def test_manifest_records_tokenizer_files_counts_checksums_and_config(tmp_path):
    docs = corpus(40)
    out, report = tokenize(tmp_path, docs, validation_fraction=0.25, seed=7)
    m = shards.read_manifest(out)
    d = gpt2_files_dir()
    assert m["tokenizer"]["name"] == "gpt2"
    assert m["tokenizer"]["files"] == {
        "encoder.json": sha256_file(d / "encoder.json"),
        "vocab.bpe": sha256_file(d / "vocab.bpe"),
    }
    assert (m["vocab_size"], m["eos_id"], m["dtype"]) == (50257, 50256, "uint16")
    n_val = sum(is_validation(x["id"], 0.25, 7) for x in docs)
    assert m["splits"]["validation"]["num_documents"] == n_val
    assert m["splits"]["train"]["num_documents"] == 40 - n_val
    assert report["splits"]["train"]["tokens"] == m["splits"]["train"]["num_tokens"]
    cfg = m["pipeline"]["config"]
    assert cfg["validation_fraction"] == 0.25 and cfg["seed"] == 7
    assert cfg["tokenizer"] == {"name": "gpt2", "path": None}
    assert cfg["input"].endswith("out.jsonl")
    assert m["split"]["validation_fraction"] == 0.25
    shards.verify(out)  # every per-shard sha256 matches the files


def test_split_depends_only_on_the_document_id_not_order_or_company(tmp_path):
    docs = corpus(400)
    a, _ = tokenize(tmp_path, docs, "a", validation_fraction=0.2)
    shuffled = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))]
    b, _ = tokenize(tmp_path, shuffled + corpus(100, prefix="other"), "b", validation_fraction=0.2)

    def val_texts(out):
        return sorted(tuple(x.tolist()) for x in shards.iter_documents(out, "validation"))

    va = val_texts(a)
    vb = set(val_texts(b))
    assert all(t in vb for t in va)
    # 400 documents at 0.2: mean 80, sd 8; +-5 sd
    assert 40 <= len(va) <= 120


def test_validation_fraction_is_close_to_the_requested_share():
    ids = [f"doc-{i}" for i in range(20000)]
    share = sum(is_validation(i, 0.05, 0) for i in ids) / len(ids)
    # binomial sd = sqrt(.05 * .95 / 20000) = 0.0015; +-5 sd
    assert abs(share - 0.05) < 0.0077
    assert sum(is_validation(i, 0.05, 1) != is_validation(i, 0.05, 0) for i in ids) > 500


def test_weight_two_writes_each_training_document_twice_a_pass_apart(tmp_path):
    docs = [dict(d, meta={"source": "web"}) for d in corpus(30)]
    out, report = tokenize(tmp_path, docs, validation_fraction=0.2, weights={"web": 2})
    train = [x.tolist() for x in shards.iter_documents(out, "train")]
    val = [x.tolist() for x in shards.iter_documents(out, "validation")]
    n = len(train) // 2
    assert len(train) == 2 * n and train[:n] == train[n:]
    assert len(val) + n == 30  # validation documents are not repeated
    assert report["extra_copies"] == n


def test_fractional_and_zero_weights_subsample_and_drop_by_source(tmp_path):
    docs = [dict(d, meta={"source": "half"}) for d in corpus(400)]
    docs += [dict(d, meta={"source": "none"}) for d in corpus(50, prefix="z")]
    docs += corpus(20, prefix="plain")  # no meta.source: weight 1
    out, report = tokenize(
        tmp_path, docs, validation_fraction=0.0, weights={"half": 0.5, "none": 0}
    )
    kept = report["splits"]["train"]["documents"]
    expected = sum(train_copies(d["id"], 0.5, 0) for d in docs[:400]) + 20
    assert kept == expected
    # 400 at p = 0.5: mean 200, sd 10; +-5 sd
    assert 150 <= kept - 20 <= 250
    assert report["dropped_by_weight"] == 450 - (kept - 20)


def test_manifest_counts_tokens_by_source_as_each_source_tokenized_alone(tmp_path):
    web = [dict(d, meta={"source": "web"}) for d in corpus(40, prefix="w")]
    books = [dict(d, meta={"source": "books"}) for d in corpus(40, prefix="b")]
    plain = corpus(10, prefix="p")  # no meta.source
    kw = dict(validation_fraction=0.2, weights={"web": 2})  # web's train copies count twice
    out, _ = tokenize(tmp_path, web + books + plain, "mixed", **kw)
    m = shards.read_manifest(out)
    assert set(m["tokens_by_source"]) == {"web", "books", "(none)"}
    assert sum(m["tokens_by_source"].values()) == m["splits"]["train"]["num_tokens"]
    val = m["validation_tokens_by_source"]
    assert sum(val.values()) == m["splits"]["validation"]["num_tokens"] > 0
    for name, docs in (("web", web), ("books", books), ("(none)", plain)):
        alone = shards.read_manifest(tokenize(tmp_path, docs, f"alone-{len(name)}", **kw)[0])
        assert m["tokens_by_source"][name] == alone["splits"]["train"]["num_tokens"]
        assert val.get(name, 0) == alone["splits"]["validation"]["num_tokens"]


def test_two_workers_write_the_same_bytes_as_one(tmp_path):
    docs = corpus(300)
    a, _ = tokenize(tmp_path, docs, "a", workers=1, batch_bytes=2000, validation_fraction=0.1)
    b, rb = tokenize(tmp_path, docs, "b", workers=2, batch_bytes=2000, validation_fraction=0.1)
    ma, mb = shards.read_manifest(a), shards.read_manifest(b)
    assert ma["splits"] == mb["splits"]  # same per-shard sha256
    assert rb["workers"] == 2


def test_bad_lines_are_rejected_with_file_and_line_and_exit_status_3(tmp_path):
    good = corpus(5)
    lines = [json.dumps(d) for d in good]
    lines[1:1] = ["{not json", json.dumps({"id": "x"}), json.dumps({"text": ""}), "[1, 2]"]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    proc = run_cli(f"input={inp}", f"output={tmp_path / 'out'}", "validation_fraction=0")
    assert proc.returncode == 3, proc.stderr
    rejected = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejected] == [(str(inp), n) for n in (2, 3, 4, 5)]
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["rejects"]["total"] == 4
    tok = Tokenizer(TokenizerSpec())
    got = [x.tolist() for x in shards.iter_documents(tmp_path / "out")]
    assert got == [tok.encode(d["text"]).tolist() for d in good]  # nothing accepted is lost


def test_clean_input_exits_0(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", corpus(3))
    proc = run_cli(f"input={inp}", f"output={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["documents_in"] == 3


def test_opt_without_path_fails_with_a_clear_message_and_no_output(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", corpus(3))
    proc = run_cli(f"input={inp}", f"output={tmp_path / 'out'}", "tokenizer.name=opt")
    assert proc.returncode == 1
    assert "tokenizer.name=opt needs tokenizer.path" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_misspelt_key_is_refused_naming_it(tmp_path):
    proc = run_cli("input=x", f"output={tmp_path / 'out'}", "validation_fractoin=0.1")
    assert proc.returncode == 1
    assert "validation_fractoin" in proc.stderr


@pytest.mark.slow
def test_killed_run_leaves_old_output_intact_and_a_rerun_completes(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", corpus(10))
    out = tmp_path / "out"
    assert run_cli(f"input={small}", f"output={out}").returncode == 0
    before = shards.read_manifest(out)

    # short documents (~50 tokens): about 60 shards of 20k tokens, a second or two of work
    big_docs = [{"text": f"{TEXTS[i % 4]} #{i}", "id": f"b{i}"} for i in range(20000)]
    big = write_jsonl(tmp_path / "big.jsonl", big_docs)
    args = [f"input={big}", f"output={out}", "batch_bytes=20000", "max_shard_tokens=20000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.tokenize", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its group holds every process it starts
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*/train-00003.tokens")):
        assert proc.poll() is None, "finished before it could be killed; make the input bigger"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_no_stage_processes(proc.pid)  # none outlives the driver
    assert list(tmp_path.glob(".out.tmp-*"))  # the half-written set is only a temporary
    assert shards.read_manifest(out) == before
    shards.verify(out)

    assert run_cli(*args).returncode == 0
    assert not list(tmp_path.glob(".out.*"))  # the killed run's temporary was cleared
    shards.verify(out)
    ref, _ = tokenize(tmp_path, str(big), "ref", batch_bytes=20000, max_shard_tokens=20000)
    m_out, m_ref = shards.read_manifest(out), shards.read_manifest(ref)
    assert m_out["splits"] == m_ref["splits"]
    assert m_out["splits"]["train"]["num_documents"] + m_out["splits"]["validation"][
        "num_documents"
    ] == len(big_docs)


def test_a_clean_rerun_removes_the_previous_runs_rejects_file(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "fine", "id": "1"}\n{broken\n')
    out = tmp_path / "out"
    assert run(TokenizeConfig(input=str(inp), output=str(out)))["rejects"]["total"] == 1
    assert (tmp_path / "out.rejects.jsonl").is_file()
    inp.write_text('{"text": "fine", "id": "1"}\n')
    assert run(TokenizeConfig(input=str(inp), output=str(out)))["rejects"]["total"] == 0
    assert not (tmp_path / "out.rejects.jsonl").exists()


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def three_files(tmp_path: Path) -> Path:
    """Three input files, each with two bad lines, sources with weights 2, 0.5 and 1."""
    d = tmp_path / "in"
    d.mkdir()
    for k, source in enumerate(["web", "books", "plain"]):
        docs = [dict(x, meta={"source": source}) for x in corpus(60, prefix=f"f{k}-")]
        write_jsonl(d / f"f{k}.jsonl", docs)
        with open(d / f"f{k}.jsonl", "a") as f:
            f.write('{"text": ""}\nnot json\n')
    return d


def test_three_tasks_on_two_workers_write_one_tasks_bytes_counts_and_rejects(tmp_path):
    d = three_files(tmp_path)
    kw = dict(validation_fraction=0.2, weights={"web": 2, "books": 0.5}, max_shard_tokens=3000)
    # The same output path both times, so that the manifests' records can be compared too.
    one, r1 = tokenize(tmp_path, str(d), "out", tasks=1, **kw)
    one_bytes, one_rejects = shard_bytes(one), (tmp_path / "out.rejects.jsonl").read_bytes()
    three, r3 = tokenize(tmp_path, str(d), "out", tasks=3, workers=2, **kw)
    assert (r1["tasks"], r3["tasks"]) == (1, 3)
    assert len([n for n in one_bytes if n.startswith("train-")]) > 6  # re-chunked across tasks
    assert shard_bytes(three) == one_bytes  # every shard and the manifest
    for k in ("documents_in", "bytes_in", "dropped_by_weight", "extra_copies", "splits"):
        assert r3[k] == r1[k], k
    assert r1["extra_copies"] > 0 and r1["dropped_by_weight"] > 0
    assert r3["rejects"] == r1["rejects"] and r3["rejects"]["total"] == 6
    got = [json.loads(x) for x in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(Path(r["file"]).name, r["line"]) for r in got] == [
        (f"f{k}.jsonl", n) for k in range(3) for n in (61, 62)
    ]
    assert (tmp_path / "out.rejects.jsonl").read_bytes() == one_rejects
    # The order one task writes: the first pass, then the extra copies, then validation.
    tok = Tokenizer(TokenizerSpec())
    docs = [json.loads(x) for f in sorted(d.iterdir()) for x in f.read_text().splitlines()[:60]]
    weight = {"web": 2.0, "books": 0.5, "plain": 1.0}
    train = [d for d in docs if not is_validation(d["id"], 0.2, 0)]
    first = [d for d in train if train_copies(d["id"], weight[d["meta"]["source"]], 0) >= 1]
    again = [d for d in train if train_copies(d["id"], weight[d["meta"]["source"]], 0) >= 2]
    want = [tok.encode(d["text"]).tolist() for d in first + again]
    assert [x.tolist() for x in shards.iter_documents(three, "train")] == want


@pytest.mark.slow
def test_a_killed_task_is_rerun_alone_and_the_shards_are_the_same_bytes(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(3):
        docs = [{"text": f"{TEXTS[i % 4]} #{k}.{i}", "id": f"{k}.{i}"} for i in range(8000)]
        write_jsonl(d / f"f{k}.jsonl", docs)
    out = tmp_path / "out"
    tokenize(tmp_path, str(d), "out", tasks=1)
    ref = shard_bytes(out)
    shutil.rmtree(out)
    args = [f"input={d}", f"output={out}", "tasks=3", "workers=1", "keep_work=true"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.tokenize", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its group holds every process it starts
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    work = tmp_path / ".out.work"
    deadline = time.monotonic() + 60
    while not list((work / "parts").glob(".part-00001.tmp-*")):  # task 1 is writing
        assert proc.poll() is None, "finished before it could be killed; make the input bigger"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert_no_stage_processes(proc.pid)  # none outlives the driver
    assert not out.exists()
    done = work / "executor" / "tokenize" / "completions"
    assert sorted(p.name for p in done.iterdir()) == ["00000"]
    part0 = (work / "parts" / "part-00000" / "train-00000.tokens").stat().st_ino
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    # Task 0 was not run again: its part is the file it wrote before the kill.
    assert (work / "parts" / "part-00000" / "train-00000.tokens").stat().st_ino == part0
    assert shard_bytes(out) == ref
    assert not list(tmp_path.glob(".out.tmp-*")) and not list((work / "parts").glob(".*"))
