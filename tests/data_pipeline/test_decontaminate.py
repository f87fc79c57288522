"""The decontamination stage: corpus documents sharing a word 13-gram with evaluation texts (a
local lm-eval task over local JSONL, plain JSONL) are found, counted per task and per source,
and removed or masked; unrelated documents are kept; the output is the same for any split;
bad evaluation input is refused naming the file and line or the task."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.stages.decontaminate import DecontaminateConfig, run
from data_pipeline.stages.decontaminate.ngrams import NgramIndex, text_ngrams, words
from data_pipeline.stages.decontaminate.scan import Decontaminator
from data_pipeline.stages.decontaminate.stage import matches_path
from tests.data_pipeline.test_reddit import parts_bytes

# Made-up words, so no 13-gram of the corpus meets an evaluation text by chance.
VOCAB = [f"w{a}{b}" for a in "bcdfghjklm" for b in "aeiouy"]


def phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# A multiple-choice task as lm-eval users write one: its data a local JSONL file.
TASK_YAML = """\
task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """A corpus of three files (sources web and books) in which some documents hold 13 words
    of an evaluation text (re-cased and re-punctuated), one holds 12, and the rest none."""
    d = tmp_path_factory.mktemp("decont")
    rng = random.Random(0)
    question, gold, wrong = phrase(rng, 20), phrase(rng, 10), phrase(rng, 10)
    task_dir = d / "tasks"
    task_dir.mkdir()
    data = jsonl(
        task_dir / "toy_mc.jsonl", [{"question": question, "choices": [wrong, gold], "label": 1}]
    )
    (task_dir / "toy_mc.yaml").write_text(TASK_YAML.format(data=data))
    quiz = phrase(rng, 30)
    evals = jsonl(d / "eval.jsonl", [{"text": quiz, "task": "quiz"}, {"text": "too short"}])

    def doc(i: str, source: str, text: str) -> dict:
        return {"text": text, "id": i, "meta": {"source": source}}

    q, g, z = question.split(), gold.split(), quiz.split()
    # lm-eval formats the document as "Question: <q>\nAnswer: <gold>": a 13-gram across the
    # question's end and the gold answer matches only if the stage joins them that way.
    across = " ".join([*q[-6:], "answer", *g[:6]])
    files = {
        "web-0.jsonl": [
            doc("web/clean-1", "web", phrase(rng, 40)),
            doc(
                "web/quiz-13",
                "web",
                f"{phrase(rng, 5)} {' '.join(z[3:16]).upper()}, {phrase(rng, 5)}",
            ),
            doc("web/quiz-12", "web", f"{phrase(rng, 5)} {' '.join(z[3:15])} {phrase(rng, 5)}"),
        ],
        "web-1.jsonl": [
            doc("web/toy-across", "web", f"{phrase(rng, 4)} {across}. {phrase(rng, 4)}"),
            doc("web/clean-2", "web", phrase(rng, 30)),
            doc("web/toy-wrong", "web", " ".join([*q[-6:], "answer", *wrong.split()[:6]])),
        ],
        "books.jsonl": [
            doc("books/quiz-all", "books", "; ".join(z)),
            doc("books/clean-3", "books", phrase(rng, 50)),
        ],
    }
    corpus = d / "corpus"
    corpus.mkdir()
    for name, rows in files.items():
        jsonl(corpus / name, rows)
    return {"dir": d, "corpus": corpus, "eval": evals, "tasks": task_dir}


def config(planted: dict, output: Path, **kw) -> DecontaminateConfig:
    keys = {
        "eval": str(planted["eval"]),
        "eval_tasks": ["toy_mc"],
        "include_path": str(planted["tasks"]),
        "include_defaults": False,  # lm-eval's own ~15k tasks take seconds to index
        "progress": False,
    }
    return DecontaminateConfig(input=str(planted["corpus"]), output=str(output), **(keys | kw))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path) -> None:
    """No network, and lm-eval's dataset loads (not streamed) into a private `datasets` cache
    rather than the user's (`datasets` reads HF_DATASETS_CACHE once, at import)."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in parts_bytes(path).decode().splitlines()]


def test_planted_13grams_of_an_lm_eval_task_and_a_jsonl_file_are_removed_and_counted(
    planted, tmp_path
):
    one = run(config(planted, tmp_path / "one.jsonl", action="remove", tasks=1))
    assert ids(tmp_path / "one.jsonl") == [  # input order: the files' names sorted
        "books/clean-3", "web/clean-1", "web/quiz-12", "web/clean-2", "web/toy-wrong",
    ]  # fmt: skip
    assert (one["docs_in"], one["docs_removed"], one["docs_out"]) == (8, 3, 5)
    assert one["eval"]["quiz"] == {
        "texts": 1, "short_texts": 0, "ngrams": 18, "documents": 2, "ngram_hits": 1 + 18,
    }  # fmt: skip
    assert one["index"] == {"ngrams": 18 + 20, "bytes": 12 * 38}  # quiz's and toy_mc's
    assert one["eval"]["eval"]["short_texts"] == 1  # "too short": the file's name is its task
    toy = one["eval"]["toy_mc"]
    assert (toy["texts"], toy["documents"], toy["ngram_hits"]) == (1, 1, 1)
    assert one["by_source"] == {
        "web": {"docs_in": 6, "documents": 2, "ngram_hits": 2},
        "books": {"docs_in": 2, "documents": 1, "ngram_hits": 18},
    }
    assert [e["id"] for e in one["examples"]["quiz"]] == ["books/quiz-all", "web/quiz-13"]
    found = [json.loads(x) for x in matches_path(tmp_path / "one.jsonl").read_text().splitlines()]
    assert [(m["id"], sorted(m["tasks"])) for m in found] == [
        ("books/quiz-all", ["quiz"]), ("web/quiz-13", ["quiz"]), ("web/toy-across", ["toy_mc"]),
    ]  # fmt: skip

    three = run(config(planted, tmp_path / "three", action="remove", tasks=3, workers=2))
    assert three["tasks"] == 3
    assert parts_bytes(tmp_path / "three") == (tmp_path / "one.jsonl").read_bytes()
    for k in ("docs_in", "docs_out", "docs_removed", "eval", "by_source", "examples"):
        assert three[k] == one[k], k
    assert (
        matches_path(tmp_path / "three").read_bytes()
        == matches_path(tmp_path / "one.jsonl").read_bytes()
    )


def test_mask_replaces_only_the_matching_span_and_report_keeps_every_document(planted, tmp_path):
    masked = run(config(planted, tmp_path / "m.jsonl", action="mask", mask_with="<m>"))
    out = {json.loads(x)["id"]: json.loads(x)["text"] for x in (tmp_path / "m.jsonl").open()}
    assert "books/quiz-all" not in out  # nothing left but the evaluation text
    assert (masked["docs_masked"], masked["docs_emptied"], masked["spans_masked"]) == (2, 1, 3)
    w = "w[a-z]{2}"  # a word of VOCAB
    # the 13 upper-cased words between 5 random ones and ", " + 5 random ones
    assert re.fullmatch(rf"({w} ){{5}}<m>, ({w} ){{4}}{w}", out["web/quiz-13"])
    # the 13-gram "<question's last 6 words> answer <gold's first 6 words>" and nothing else
    assert re.fullmatch(rf"({w} ){{4}}<m>\. ({w} ){{3}}{w}", out["web/toy-across"])

    report = run(config(planted, tmp_path / "r.jsonl"))  # action=report, the default
    assert report["docs_contaminated"] == 3 and report["docs_out"] == report["docs_in"] == 8
    read = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert read == [json.loads(x) for x in parts_bytes(planted["corpus"]).splitlines()]


def test_words_are_lowercased_alphanumeric_runs_so_case_and_punctuation_never_hide_a_match():
    assert words("The U.S.A.'s  Flag_day:\n3-D CAFÉ") == [
        "the", "u", "s", "a", "s", "flag", "day", "3", "d", "café",
    ]  # fmt: skip
    _, a = text_ngrams("one two three four five six", 3)
    _, b = text_ngrams("ONE, two -- three! Four\nfive (six)", 3)
    assert len(a) == 4 and a.tolist() == b.tolist()


def test_finds_the_documents_lm_evals_janitor_finds_when_punctuation_is_only_at_word_edges():
    """lm-eval's janitor (its GPT-3 decontamination) as the reference: it deletes ASCII
    punctuation where this stage splits on it, which is the same words while punctuation
    sits only at the edges of words."""
    import numpy as np
    from lm_eval.decontamination.janitor import Janitor, word_ngrams_indices

    rng = random.Random(1)

    def noisy(words: list[str]) -> str:  # case and edge punctuation, as real text has them
        return " ".join(
            rng.choice(["", "", "(", '"']) + (w.upper() if rng.random() < 0.2 else w)
            + rng.choice(["", "", ",", ".", "!", ")"])
            for w in words
        )  # fmt: skip

    evals = [phrase(rng, 40) for _ in range(5)]
    docs = []
    for i in range(150):
        words = phrase(rng, 30).split()
        if i % 3 == 0:  # 10 to 16 words of an evaluation text, somewhere in the document
            src, k = rng.choice(evals).split(), rng.randint(10, 16)
            at, start = rng.randrange(len(words)), rng.randrange(len(src) - k)
            words[at:at] = src[start : start + k]
        docs.append(noisy(words))
    janitor = Janitor(ngram_n=13)
    for e in evals:
        janitor.register_contaminant_python(noisy(e.split()))
    ref = [
        any(janitor.normalize_string(g) in janitor.dirt_ngrams for g, _ in word_ngrams_indices(d, 13))
        for d in docs
    ]  # fmt: skip
    index = NgramIndex.build([np.unique(np.concatenate([text_ngrams(e, 13)[1] for e in evals]))])
    dec = Decontaminator(DecontaminateConfig(input="-", output="-", eval="-"), index, ["t"])
    ours = [dec({"text": d, "id": str(i), "meta": {}})[1] is not None for i, d in enumerate(docs)]
    assert ours == ref
    assert 10 < sum(ours) < 50  # planted overlaps of 13 words or more, and only those


def test_min_ngrams_sets_how_many_distinct_task_ngrams_make_a_document_contaminated():
    _, ev = text_ngrams(" ".join(VOCAB[:20]), 13)  # 8 distinct 13-grams
    index = NgramIndex.build([ev])
    one_gram = " ".join(VOCAB[:13])  # exactly one of them, twice
    doc = {"text": f"{one_gram} x {one_gram}", "id": "d", "meta": {}}
    cfg = DecontaminateConfig(input="-", output="-", eval="-", min_ngrams=1)
    assert Decontaminator(cfg, index, ["t"])(doc)[1]["tasks"] == {"t": {"ngrams": 1, "hits": 2}}
    cfg.min_ngrams = 2
    assert Decontaminator(cfg, index, ["t"])(doc) == (doc, None)


@pytest.mark.parametrize(
    ("keys", "text", "totals"),
    [
        ({}, "aa bb <m> ff gg <m>", {"spans_masked": 2, "docs_masked": 1}),
        # 3 characters more each side; the single space left between the cuts is kept
        ({"mask_window": 3}, "aa <m> <m>", {"spans_masked": 2, "docs_masked": 1}),
        # ... and with min_piece 2 goes with them; "aa " (3 characters) stays
        ({"mask_window": 3, "mask_min_piece": 2}, "aa <m>", {"spans_masked": 1}),
        ({"mask_window": 3, "mask_min_piece": 4}, None, {"docs_emptied": 1}),  # no word left
        ({"mask_max_hits": 1}, None, {"docs_too_dirty": 1}),  # 2 n-grams: removed whole
    ],
)
def test_mask_cuts_each_span_widened_by_window_absorbing_short_pieces(keys, text, totals):
    ev = [text_ngrams(t, 3)[1] for t in ("cc dd ee", "hh ii jj")]
    cfg = DecontaminateConfig(
        input="-", output="-", eval="-", ngram=3, action="mask", mask_with="<m>", **keys
    )
    dec = Decontaminator(cfg, NgramIndex.build(ev), ["a", "b"])
    kept, record = dec({"text": "aa bb cc dd ee ff gg hh ii jj", "id": "d", "meta": {}})
    assert record["tasks"] == {"a": {"ngrams": 1, "hits": 1}, "b": {"ngrams": 1, "hits": 1}}
    assert (kept and kept["text"]) == text
    assert totals == {k: dec.totals[k] for k in totals}


def test_an_eval_line_that_is_not_json_is_refused_naming_file_and_line(planted, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    cfg = config(planted, tmp_path / "out.jsonl", eval=str(bad), eval_tasks=[])
    with pytest.raises(ValueError, match=rf"eval file {bad}:3: not a JSON line"):
        run(cfg)
    assert not (tmp_path / "out.jsonl").exists()


def test_an_unknown_lm_eval_task_is_refused_by_name(planted, tmp_path):
    cfg = config(planted, tmp_path / "out.jsonl", eval_tasks=["toy_mcq"])
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'toy_mcq'.*did you mean toy_mc"):
        run(cfg)
    assert not (tmp_path / "out.jsonl").exists()


def test_chain_step_removes_contaminated_documents_before_tokenize_and_reruns_on_new_eval(
    planted, tmp_path
):
    """`steps: [decontaminate]` over two sources: its report counts per source; the token
    shards lack the removed documents; a re-run skips it until the eval file changes."""
    from data_pipeline import shards
    from data_pipeline.chain import ChainConfig, CorpusConfig
    from data_pipeline.chain import run as run_chain

    evals = tmp_path / "eval.jsonl"
    evals.write_bytes(planted["eval"].read_bytes())
    cfg = ChainConfig(
        work_dir=str(tmp_path / "work"),
        sources=[
            CorpusConfig(name=n, input=str(planted["corpus"] / f"{n}.jsonl"))
            for n in ("web-0", "books")
        ],
        steps=["decontaminate"],
        decontaminate={"eval": str(evals), "action": "remove"},
        tokenize={"validation_fraction": 0.0},
        progress=False,
    )
    first = run_chain(cfg)
    assert "decontaminate:all" in first["ran"]
    rep = json.loads((tmp_path / "work" / "decontaminate" / "all.report.json").read_text())
    assert rep["by_source"] == {
        "web-0": {"docs_in": 3, "documents": 1, "ngram_hits": 1},
        "books": {"docs_in": 2, "documents": 1, "ngram_hits": 18},
    }
    assert len(list(shards.iter_documents(tmp_path / "work" / "tokens"))) == 5 - 2

    assert "decontaminate:all" in run_chain(cfg)["skipped"]
    evals.write_text(json.dumps({"text": "an unrelated evaluation text", "task": "quiz"}) + "\n")
    again = run_chain(cfg)
    assert "decontaminate:all" in again["ran"]
    assert len(list(shards.iter_documents(tmp_path / "work" / "tokens"))) == 5


def test_cli_exits_1_naming_the_bad_eval_line_and_refuses_a_run_without_eval(planted, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "data_pipeline.decontaminate", *args, "progress=false"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    out = tmp_path / "out.jsonl"
    done = cli(f"input={planted['corpus']}", f"output={out}", f"eval={bad}")
    assert done.returncode == 1
    assert f"eval file {bad}:2: not a JSON line" in done.stderr
    done = cli(f"input={planted['corpus']}", f"output={out}")
    assert done.returncode == 1
    assert "nothing to decontaminate against: set eval= and/or eval_tasks=" in done.stderr
    assert not out.exists()
