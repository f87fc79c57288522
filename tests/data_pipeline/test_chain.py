"""The chain: sources through ingest to token shards, and what a re-run skips or redoes.

Most tests use `steps=[]` (ingest -> tokenize) so that they check the chain's own logic
whatever document stages are installed; the missing-stage tests point the stage table at a
module that cannot exist. One runs the real chain: a reddit source, clean and dedup.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf.errors import ConfigKeyError

from data_pipeline import chain, shards
from data_pipeline.chain import ChainConfig, CorpusConfig, run
from data_pipeline.documents import Rejects, read_documents
from data_pipeline.tokenizer import Tokenizer, TokenizerSpec

from .conftest import assert_no_stage_processes

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def docs(prefix: str, n: int) -> list[dict]:
    return [{"text": f"{prefix} document number {i}, with text.", "id": str(i)} for i in range(n)]


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    return {
        "web": write_jsonl(tmp_path / "in" / "web.jsonl", docs("web", 40)),
        "books": write_jsonl(tmp_path / "in" / "books.jsonl", docs("books", 30)),
    }


def config(tmp_path, sources, **kw) -> ChainConfig:
    srcs = kw.pop("source_list", None) or [
        CorpusConfig(name="web", input=str(sources["web"]), weight=kw.pop("web_weight", 1.0)),
        CorpusConfig(
            name="books",
            input={"hf": {"path": "json", "data_files": str(sources["books"])}},
            weight=2.0,
        ),
    ]
    tokenize = {"validation_fraction": 0.1, **kw.pop("tokenize", {})}
    kw.setdefault("steps", [])
    return ChainConfig(work_dir=str(tmp_path / "work"), sources=srcs, tokenize=tokenize, **kw)


def test_chain_tokenizes_every_source_with_weights_and_records_the_pipeline(tmp_path, sources):
    report = run(config(tmp_path, sources))
    out = tmp_path / "work" / "tokens"
    assert report["ran"] == ["ingest:web", "ingest:books", "tokenize:tokens"]
    assert report["rejects"]["total"] == 0
    shards.verify(out)
    m = shards.read_manifest(out)
    tok = Tokenizer(TokenizerSpec())
    texts = [tok.decode(d) for d in shards.iter_documents(out)]
    web = [t for t in texts if t.startswith("web")]
    books = [t for t in texts if t.startswith("books")]
    n_val_books = sum(1 for t in map(tok.decode, shards.iter_documents(out, "validation"))
                      if t.startswith("books"))  # fmt: skip
    assert len(web) == 40  # weight 1: each once
    assert len(books) == 2 * 30 - n_val_books  # weight 2: training documents twice
    upstream = m["pipeline"]["upstream"]
    assert [s["name"] for s in upstream["chain"]["sources"]] == ["web", "books"]
    assert upstream["chain"]["sources"][1]["input"]["hf"]["path"] == "json"
    assert m["pipeline"]["config"]["weights"] == {"web": 1.0, "books": 2.0}


def test_ingest_prefixes_ids_with_the_source_and_tags_meta(tmp_path, sources):
    run(config(tmp_path, sources))
    from data_pipeline.documents import Rejects, read_documents

    got = list(read_documents(tmp_path / "work" / "ingest" / "books", Rejects(None)))
    assert [d["id"] for d in got[:2]] == ["books/0", "books/1"]
    assert got[0]["meta"] == {"source": "books"}


def test_rerun_with_nothing_changed_skips_every_step_and_touches_nothing(tmp_path, sources):
    run(config(tmp_path, sources))
    out = tmp_path / "work" / "tokens"
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    report = run(config(tmp_path, sources))
    assert report["ran"] == []
    assert report["skipped"] == ["ingest:web", "ingest:books", "tokenize:tokens"]
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_changed_tokenize_parameter_reruns_only_tokenize(tmp_path, sources):
    run(config(tmp_path, sources))
    report = run(config(tmp_path, sources, tokenize={"validation_fraction": 0.5}))
    assert report["ran"] == ["tokenize:tokens"]
    m = shards.read_manifest(tmp_path / "work" / "tokens")
    assert m["pipeline"]["config"]["validation_fraction"] == 0.5


def test_a_changed_weight_reruns_tokenize_but_not_ingest(tmp_path, sources):
    run(config(tmp_path, sources))
    report = run(config(tmp_path, sources, web_weight=3.0))
    assert report["ran"] == ["tokenize:tokens"]


def test_a_runtime_only_parameter_does_not_invalidate_anything(tmp_path, sources):
    run(config(tmp_path, sources))
    assert run(config(tmp_path, sources, tokenize={"workers": 2}))["ran"] == []


def test_a_changed_input_file_reruns_its_source_and_everything_downstream(tmp_path, sources):
    run(config(tmp_path, sources))
    write_jsonl(sources["web"], docs("web", 41))
    report = run(config(tmp_path, sources))
    assert report["ran"] == ["ingest:web", "tokenize:tokens"]
    assert report["skipped"] == ["ingest:books"]
    texts = [
        Tokenizer(TokenizerSpec()).decode(d)
        for d in shards.iter_documents(tmp_path / "work" / "tokens")
    ]
    assert "web document number 40, with text." in texts


def test_a_damaged_output_is_rebuilt_and_identical_bytes_leave_downstream_skipped(
    tmp_path, sources
):
    run(config(tmp_path, sources))
    ingested = tmp_path / "work" / "ingest" / "web" / "part-00000.jsonl.zst"
    good = ingested.read_bytes()
    ingested.write_bytes(good[:-10])
    report = run(config(tmp_path, sources))
    # ingest rewrote the same bytes, so tokenize's recorded inputs still match
    assert report["ran"] == ["ingest:web"]
    assert ingested.read_bytes() == good


def test_a_damaged_token_shard_is_rebuilt(tmp_path, sources):
    run(config(tmp_path, sources))
    shard = tmp_path / "work" / "tokens" / "train-00000.tokens"
    shard.write_bytes(b"\0\0" + shard.read_bytes()[2:])
    assert run(config(tmp_path, sources))["ran"] == ["tokenize:tokens"]
    shards.verify(tmp_path / "work" / "tokens")


def test_a_step_without_its_record_is_redone(tmp_path, sources):
    """A run killed after a stage wrote its output but before the record: not trusted."""
    run(config(tmp_path, sources))
    (tmp_path / "work" / "ingest" / "books.stage.json").unlink()
    assert run(config(tmp_path, sources))["ran"] == ["ingest:books"]


def test_rejects_of_any_step_are_summed_into_the_chain_report(tmp_path, sources):
    bad = tmp_path / "in" / "bad.jsonl"
    bad.write_text('{"text": "fine", "id": "1"}\n{oops\n{"text": ""}\n')
    srcs = [CorpusConfig(name="bad", input=str(bad))]
    report = run(config(tmp_path, sources, source_list=srcs))
    assert report["rejects"]["total"] == 2
    assert report["rejects"]["by_file"] == {
        str(bad): {"invalid json (Expecting property name enclosed in double quotes)": 1,
                   "empty text": 1}
    }  # fmt: skip
    # a re-run that skips still reports what the skipped step rejected
    again = run(config(tmp_path, sources, source_list=srcs))
    assert again["ran"] == [] and again["rejects"]["total"] == 2


def test_a_missing_document_stage_fails_before_any_work_naming_the_module(
    tmp_path, sources, monkeypatch
):
    monkeypatch.setitem(chain.STAGES, "clean", ("data_pipeline.no_such_stage", "X", "run"))
    cfg = config(tmp_path, sources)
    cfg.steps = ["clean"]
    with pytest.raises(ModuleNotFoundError, match="data_pipeline.no_such_stage"):
        run(cfg)
    assert not (tmp_path / "work" / "ingest").exists()


def test_missing_stages_skip_passes_documents_through_and_says_so(tmp_path, sources, monkeypatch):
    monkeypatch.setitem(chain.STAGES, "clean", ("data_pipeline.no_such_stage", "X", "run"))
    monkeypatch.setitem(chain.STAGES, "dedup", ("data_pipeline.no_such_stage2", "X", "run"))
    cfg = config(tmp_path, sources, missing_stages="skip")
    cfg.steps = ["clean", "dedup"]
    report = run(cfg)
    missing = [(s["stage"], s["label"]) for s in report["steps"] if s["status"] == "missing"]
    assert missing == [("clean", "web"), ("clean", "books"), ("dedup", "all")]
    m = shards.read_manifest(tmp_path / "work" / "tokens")
    assert m["pipeline"]["upstream"]["missing_stages"] == ["clean", "clean", "dedup"]
    assert sum(m["splits"][s]["num_documents"] for s in m["splits"]) > 70


def test_an_unknown_stage_parameter_is_refused_naming_it(tmp_path, sources):
    with pytest.raises(ConfigKeyError, match="validation_fractoin"):
        run(config(tmp_path, sources, tokenize={"validation_fractoin": 0.1}))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source_list": []}, "sources is empty"),
        ({"missing_stages": "maybe"}, "missing_stages"),
    ],
)
def test_bad_chain_configs_are_refused(tmp_path, sources, change, message):
    cfg = config(tmp_path, sources)
    for k, v in change.items():
        setattr(cfg, "sources" if k == "source_list" else k, v)
    with pytest.raises(ValueError, match=message):
        run(cfg)


def test_duplicate_source_names_are_refused(tmp_path, sources):
    srcs = [CorpusConfig(name="a", input=str(sources["web"]))] * 2
    with pytest.raises(ValueError, match="unique"):
        run(config(tmp_path, sources, source_list=srcs))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.slow
def test_cli_runs_a_user_yaml_and_exits_0_then_3_with_rejects(tmp_path, sources):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "run1.yaml").write_text(
        "defaults: [pipeline, _self_]\n"
        f"work_dir: {tmp_path / 'work'}\n"
        "steps: []\n"
        "sources:\n"
        f"  - {{name: web, input: {sources['web']}, weight: 1}}\n"
        "  - name: books\n"
        f"    input: {{hf: {{path: json, data_files: {sources['books']}}}}}\n"
        "    weight: 2\n"
        "tokenize: {validation_fraction: 0.1}\n"
    )
    proc = run_cli("--config-dir", str(conf), "--config-name", "run1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ran"] == ["ingest:web", "ingest:books", "tokenize:tokens"]
    assert (tmp_path / "work" / "chain.report.json").is_file()

    with open(sources["web"], "a") as f:
        f.write("{broken\n")
    proc = run_cli("--config-dir", str(conf), "--config-name", "run1")
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout)["ran"] == ["ingest:web"]  # same documents: tokenize skipped


def test_cli_without_work_dir_fails_with_exit_1(tmp_path):
    proc = run_cli("sources=[]")
    assert proc.returncode == 1
    assert "work_dir" in proc.stderr


@pytest.mark.slow
def test_a_chain_killed_during_tokenize_completes_on_rerun(tmp_path):
    big = write_jsonl(
        tmp_path / "in" / "big.jsonl",
        [{"text": f"line {i} of a longer corpus " * 3, "id": str(i)} for i in range(20000)],
    )
    args = [
        f"work_dir={tmp_path / 'work'}",
        f"sources=[{{name: big, input: {big}}}]",
        "steps=[]",
        "tokenize.batch_bytes=20000",
        "tokenize.max_shard_tokens=20000",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its group holds every process it starts
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 60
    while not list((tmp_path / "work").glob(".tokens.tmp-*/train-00003.tokens")):
        assert proc.poll() is None, "finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_no_stage_processes(proc.pid)  # none outlives the driver
    assert not (tmp_path / "work" / "tokens").exists()

    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ran"] == ["tokenize:tokens"]  # ingest had finished
    out = tmp_path / "work" / "tokens"
    shards.verify(out)
    m = shards.read_manifest(out)
    assert sum(m["splits"][s]["num_documents"] for s in m["splits"]) == 20000


def test_reddit_clean_dedup_chain_gives_the_same_tokens_for_any_split(tmp_path):
    """The real chain (a `kind: reddit` source, clean, dedup, tokenize), once with one task
    per stage and once with 3 tasks on 2 workers: the same token shards, the cross-month
    thread's longest chain intact, and exact copies removed across sources."""
    from tests.data_pipeline.pushshift_gen import scenarios, write_dump

    threads = scenarios()
    write_dump(threads, tmp_path / "dumps")
    web = [{"text": f"The web page number {i} says {i * 7} things about it.", "id": str(i)}
           for i in range(40)]  # fmt: skip
    web += [dict(d, id=f"copy-{d['id']}") for d in web[:5]]
    write_jsonl(tmp_path / "in" / "web.jsonl", web)

    def chain_run(name: str, **kw) -> dict:
        return run(
            ChainConfig(
                work_dir=str(tmp_path / name),
                sources=[
                    CorpusConfig(name="rd", kind="reddit", input=str(tmp_path / "dumps")),
                    CorpusConfig(name="web", input=str(tmp_path / "in" / "web.jsonl")),
                ],
                steps=["clean", "dedup"],
                reddit={"num_buckets": 5},
                dedup={"progress": False},
                tokenize={"validation_fraction": 0.1},
                **kw,
            )
        )

    one, many = chain_run("one", tasks=1), chain_run("many", tasks=3, workers=2)
    assert (
        [s["status"] for s in one["steps"]] == [s["status"] for s in many["steps"]] == ["ran"] * 7
    )
    for split in ("train", "validation"):
        a = [d.tolist() for d in shards.iter_documents(tmp_path / "one" / "tokens", split)]
        b = [d.tolist() for d in shards.iter_documents(tmp_path / "many" / "tokens", split)]
        assert a == b and a
    rep = json.loads((tmp_path / "many" / "dedup" / "all.report.json").read_text())
    # reddit's 3 parts stay parts: ingest, clean, dedup and tokenize all get 3 tasks
    rd_ingest = json.loads((tmp_path / "many" / "ingest" / "rd.report.json").read_text())
    assert rd_ingest["tasks"] == 3
    assert rep["tasks"]["signatures"] == 3  # 4 files (rd's 3 parts, web's 1): 3 shares
    assert len(list((tmp_path / "many" / "dedup" / "all").iterdir())) == 3
    tok = json.loads((tmp_path / "many" / "tokens.report.json").read_text())
    assert tok["tasks"] == 3  # one per part of dedup's output
    assert rep["docs_removed"] == 5
    th = next(t for t in threads if t.name == "across months")
    reddit_out = tmp_path / "many" / "reddit" / "rd"  # its parts, one per reduce task
    rd = {d["id"]: d for d in read_documents(reddit_out, Rejects(None))}
    assert rd["t3_" + th.key]["meta"]["comment_ids"] == th.expected


def one_source_of_8_files(tmp_path) -> Path:
    """8 JSONL files of one source, with a near-duplicate pair across two files."""
    d = tmp_path / "in" / "web"
    for k in range(8):
        rows = [{"text": f"Page {k}.{i} of the web tells of {k * 31 + i} things in turn.",
                 "id": f"{k}-{i}"} for i in range(12)]  # fmt: skip
        write_jsonl(d / f"web-{k}.jsonl", rows)
    with open(d / "web-7.jsonl", "a") as f:  # an exact copy of a document of file 0
        f.write(json.dumps({"text": "Page 0.3 of the web tells of 3 things in turn.", "id": "c"}))
    return d


def token_files(out: Path) -> dict[str, bytes]:
    """The shard directory's token files (the manifest records how the run was split)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != shards.MANIFEST}


def step_tasks(work: Path) -> dict[str, int]:
    rep = {s: json.loads((work / f"{s}.report.json").read_text())
           for s in ("ingest/web", "clean/web", "dedup/all", "tokens")}  # fmt: skip
    return {
        "ingest": rep["ingest/web"]["tasks"],
        "clean": rep["clean/web"]["tasks"],
        "signatures": rep["dedup/all"]["tasks"]["signatures"],
        "tokenize": rep["tokens"]["tasks"],
    }


@pytest.mark.slow
def test_one_source_is_split_into_tasks_at_every_step_with_the_same_tokens(tmp_path):
    """ONE source of 8 files at tasks=4 workers=2: ingest, clean, dedup's signatures and
    tokenize each run 4 tasks (from their reports) and the token shards are the bytes of a
    tasks=1 run."""
    src = one_source_of_8_files(tmp_path)

    def chain_run(name: str, **kw) -> dict:
        return run(ChainConfig(work_dir=str(tmp_path / name),
                               sources=[CorpusConfig(name="web", input=str(src))],
                               steps=["clean", "dedup"], progress=False,
                               tokenize={"validation_fraction": 0.1}, **kw))  # fmt: skip

    chain_run("one", tasks=1)
    many = chain_run("many", tasks=4, workers=2)
    assert step_tasks(tmp_path / "one") == dict.fromkeys(step_tasks(tmp_path / "one"), 1)
    assert step_tasks(tmp_path / "many") == {"ingest": 4, "clean": 4, "signatures": 4,
                                             "tokenize": 4}  # fmt: skip
    a, b = token_files(tmp_path / "one" / "tokens"), token_files(tmp_path / "many" / "tokens")
    assert a == b and any(n.endswith(".tokens") for n in a)
    assert (
        json.loads((tmp_path / "many" / "dedup" / "all.report.json").read_text())["docs_removed"]
        == 1
    )  # the copy across files 0 and 7, found although they were in different tasks
    assert many["rejects"]["total"] == 0


PILE_SETS = ["Pile-CC", "Enron Emails", "Wikipedia (en)", "FreeLaw"]


def pile_style(tmp_path) -> Path:
    """Pile-style records, `{"text", "meta": {"pile_set_name"}}`, in two files."""
    d = tmp_path / "in" / "pile"
    for k in range(2):
        rows = [{"text": f"{name} record {k}.{i} with its own words.",
                 "meta": {"pile_set_name": name}}
                for i in range(5) for name in PILE_SETS]  # fmt: skip
        write_jsonl(d / f"{k:02d}.jsonl", rows + [{"text": f"no meta {k}"}])
    return d


def test_include_and_exclude_keep_only_the_listed_pile_subsets(tmp_path):
    pile = pile_style(tmp_path)
    keep = {"pile_set_name": ["Pile-CC", "Wikipedia (en)", "Wikipedia"]}  # one misspelt
    srcs = [
        CorpusConfig(name="kept", input=str(pile), include=keep),
        CorpusConfig(name="rest", input=str(pile), exclude={"meta.pile_set_name": PILE_SETS[:3]}),
    ]
    report = run(ChainConfig(work_dir=str(tmp_path / "w"), sources=srcs, steps=[], tasks=2,
                             progress=False, tokenize={"validation_fraction": 0.0}))  # fmt: skip
    assert report["rejects"]["total"] == 0
    tok = Tokenizer(TokenizerSpec())
    texts = [tok.decode(d) for d in shards.iter_documents(tmp_path / "w" / "tokens")]
    subsets = sorted({t.split(" record")[0] for t in texts if " record " in t})
    assert subsets == ["FreeLaw", "Pile-CC", "Wikipedia (en)"]
    assert sum(t.startswith("Pile-CC") for t in texts) == 10
    assert sum(t.startswith("FreeLaw") for t in texts) == 10
    assert sorted(t for t in texts if t.startswith("no meta")) == ["no meta 0", "no meta 1"]
    kept = json.loads((tmp_path / "w" / "ingest" / "kept.report.json").read_text())
    assert kept["tasks"] == 2 and kept["documents_in"] == 42 and kept["documents"] == 20
    assert kept["filter"] == {
        "kept": 20,
        "dropped": {"include pile_set_name: field missing": 2,
                    "include pile_set_name: value not listed": 20},
        "dropped_values": {"pile_set_name": {"Enron Emails": 10, "FreeLaw": 10}},
        "include_never_seen": {"pile_set_name": ["Wikipedia"]},
    }  # fmt: skip
    rest = json.loads((tmp_path / "w" / "ingest" / "rest.report.json").read_text())
    assert rest["filter"]["dropped"] == {"exclude pile_set_name: value listed": 30}


@pytest.mark.parametrize(
    "include, message",
    [
        (["Pile-CC"], r"sources\.pile\.include: expected a mapping"),
        ({"pile_set_name": "Pile-CC"}, r"sources\.pile\.include\.pile_set_name: expected a non"),
        ({"pile_set_name": [{"a": 1}]}, r"sources\.pile\.include\.pile_set_name: values must"),
        ({"meta.": ["x"]}, r"sources\.pile\.include\.meta\.: not a meta field"),
    ],
)
def test_a_bad_filter_is_refused_naming_the_source_and_key(tmp_path, include, message):
    srcs = [CorpusConfig(name="pile", input=str(tmp_path), include=include)]
    with pytest.raises(ValueError, match=message):
        run(ChainConfig(work_dir=str(tmp_path / "w"), sources=srcs, steps=[]))
    assert not (tmp_path / "w").exists()  # refused before any work


@pytest.mark.slow
def test_per_source_shard_sets_after_one_joint_dedup(tmp_path, sources):
    """shards=per_source: dedup across both sources, then one shard set per source holding a
    duplicate that crossed sources once, and a data.sources snippet opt_train accepts."""
    import yaml

    from opt_train.config import DataConfig, SourceConfig

    copy = {"text": "books document number 7, with text.", "id": "copy"}
    write_jsonl(sources["web"], docs("web", 40) + [copy])
    kw = {"steps": ["dedup"], "shards": "per_source", "tokenize": {"validation_fraction": 0.0}}
    report = run(config(tmp_path, sources, progress=False, **kw))
    out = tmp_path / "work" / "tokens"
    assert report["ran"] == ["ingest:web", "ingest:books", "dedup:all", "by_source:all",
                             "tokenize:web", "tokenize:books"]  # fmt: skip
    tok = Tokenizer(TokenizerSpec())
    texts = {n: [tok.decode(d) for d in shards.iter_documents(out / n)] for n in ("web", "books")}
    assert sum(t == copy["text"] for ts in texts.values() for t in ts) == 1  # kept once,
    assert len(texts["web"]) == 41 and len(texts["books"]) == 2 * 29  # in the first source
    assert copy["text"] in texts["web"] and {t.split()[0] for t in texts["books"]} == {"books"}
    assert shards.read_manifest(out / "web")["pipeline"]["config"]["weights"] == {"web": 1.0}
    tokens = {n: shards.read_manifest(out / n)["splits"]["train"]["num_tokens"] for n in texts}
    assert report["data_sources"] == [
        {"name": n, "path": str((out / n).resolve()), "weight": tokens[n]} for n in texts
    ]
    snippet = yaml.safe_load(report["data_sources_yaml"])["data"]
    data = DataConfig(sources=[SourceConfig(**s) for s in snippet["sources"]])
    assert [(s.name, s.weight) for s in data.sources] == [(n, tokens[n]) for n in texts]
    assert run(config(tmp_path, sources, progress=False, **kw))["ran"] == []


@pytest.mark.slow  # a Ray actor per task: seconds of start-up each
def test_one_source_on_ray_is_split_at_every_step_with_the_same_tokens(tmp_path, local_ray):
    src = one_source_of_8_files(tmp_path)

    def chain_run(name: str, **kw) -> dict:
        return run(ChainConfig(work_dir=str(tmp_path / name),
                               sources=[CorpusConfig(name="web", input=str(src))],
                               steps=["clean", "dedup"], progress=False,
                               tokenize={"validation_fraction": 0.1}, **kw))  # fmt: skip

    chain_run("one", tasks=1)
    chain_run("ray", tasks=2, executor="ray", ray=local_ray)
    assert step_tasks(tmp_path / "ray") == dict.fromkeys(step_tasks(tmp_path / "one"), 2)
    assert token_files(tmp_path / "one" / "tokens") == token_files(tmp_path / "ray" / "tokens")


def test_the_opt_recipe_config_loads_and_validates(monkeypatch, tmp_path):
    """data_pipeline/conf/opt.yaml composes with the chain's schema (through Hydra, as
    `--config-name opt` does) and passes every start-up check, without running."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    tokenizer = REPO.parent / "shared" / "opt-tokenizer"
    for var, path in [("OPT_PILE", tmp_path), ("OPT_REDDIT", tmp_path),
                      ("OPT_TOKENIZER", tokenizer)]:  # fmt: skip
        monkeypatch.setenv(var, str(path))
    ConfigStore.instance().store(name="chain_schema", node=ChainConfig)
    with initialize_config_dir(config_dir=str(REPO / "data_pipeline" / "conf"), version_base=None):
        cfg = OmegaConf.to_object(compose("opt", overrides=[f"work_dir={tmp_path / 'w'}"]))
    plan = chain.ChainPlan.resolve(cfg)  # validates sources, filters and every stage's params
    assert plan.cfg.shards == "per_source" and plan.cfg.steps == ["clean", "dedup"]
    pile, reddit = plan.sources
    assert pile["include"] == {"pile_set_name": [
        "Pile-CC", "DM Mathematics", "Gutenberg (PG-19)", "HackerNews", "OpenSubtitles",
        "OpenWebText2", "USPTO Backgrounds", "Wikipedia (en)"]}  # fmt: skip
    assert reddit["kind"] == "reddit" and plan.params["reddit"]["filters"] == {"enabled": True}
    assert plan.params["dedup"]["threshold"] == 0.95 and plan.params["dedup"]["ngram"] == 5
    assert plan.params["tokenize"]["tokenizer"] == {"name": "opt", "path": str(tokenizer)}
    monkeypatch.setenv("OPT_TOKENIZER", str(tmp_path))  # no vocab.json there: refused up front
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        chain.ChainPlan.resolve(cfg.__class__(**{**cfg.__dict__, "tokenize": {
            "tokenizer": {"name": "opt", "path": str(tmp_path)}}}))  # fmt: skip


def test_hydra_flags_go_first_and_overrides_after_the_quiet_ones():
    """`python -m data_pipeline --config-name opt work_dir=x` must reach Hydra's parser with its
    overrides in one run (the quiet overrides were put first, which refused this command)."""
    got = chain._hydra_argv(
        ["--config-name", "opt", "work_dir=x", "--cfg", "job", "tasks=2"], ["q=1"]
    )
    assert got == ["--config-name", "opt", "--cfg", "job", "q=1", "work_dir=x", "tasks=2"]


def test_an_ingest_output_the_project_did_not_write_is_refused_and_kept(tmp_path, sources):
    """ingest/<name> holding a user's files (no report, no record beside it) is not replaced."""
    from data_pipeline.ownership import NotOursError

    mine = tmp_path / "work" / "ingest" / "web"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(NotOursError, match=r"output=.*ingest/web exists and is not"):
        run(config(tmp_path, sources, progress=False))
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
