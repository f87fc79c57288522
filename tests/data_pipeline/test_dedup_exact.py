"""The dedup stage's exact-duplicate pass and its per-source report: copies that differ only in
what the clean stage normalises are removed before MinHash (all but the first in input order,
the same output for any split), and the report says how much each source lost and how many
removals had their kept copy in another source."""

from __future__ import annotations

import json
import random

import pytest

from data_pipeline.stages.clean import CleanConfig, Cleaner
from data_pipeline.stages.dedup import DedupConfig, run
from tests.data_pipeline.test_reddit import parts_bytes

# What the clean stage normalises: line-break kinds, trailing spaces, runs of spaces and tabs,
# blank-line runs, surrounding whitespace.
VARIANTS = [
    lambda t: t.replace("\n", "\r\n"),
    lambda t: "  " + t.replace(" ", "   ", 5).replace("\n", "  \n") + " \n",
    lambda t: t.replace(" ", "\t", 4).replace("\n\n", "\n\n\n\n"),
]


def doc(rng: random.Random, words: int, id_: str, source: str | None) -> dict:
    """Random words in lines of 20 and paragraphs of 100 (clean keeps line breaks)."""
    seps = ["\n\n" if i % 100 == 99 else "\n" if i % 20 == 19 else " " for i in range(words)]
    text = "".join(f"w{rng.randrange(50_000)}{s}" for s in seps).strip()
    return {"text": text, "id": id_, "meta": {"source": source} if source else {}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Three files of unique documents from sources `a` and `b` (and one without a source),
    with planted copies; the fixture records what each plant must do."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("exact")
    files = [[doc(rng, 400, f"f{k}-{i}", "ab"[i % 2]) for i in range(12)] for k in range(3)]
    base_a, base_b = files[0][0], files[0][1]  # sources a and b, first in input order
    # Exact copies (whitespace variants): a -> a (same source), a -> b and b -> none (cross).
    plants = [(base_a, "a", 1, 0), (base_a, "b", 2, 1), (base_b, None, 2, 2)]
    for src_doc, source, k, v in plants:
        text = VARIANTS[v](src_doc["text"])
        files[k].insert(3, {"text": text, "id": f"exact-{k}-{v}", "meta": {"source": source}})
    # A near duplicate (one word of 400 changed: Jaccard 391/401 = 0.975) of a `b` document,
    # in source a: removed by MinHash, cross-source.
    words = files[1][1]["text"].split()
    words[200] = "changed"
    files[2].append({"text": " ".join(words), "id": "near", "meta": {"source": "a"}})
    inp = root / "in"
    inp.mkdir()
    for k, docs in enumerate(files):
        with open(inp / f"part{k}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)

    def dedup(out: str, **kw) -> dict:
        c = DedupConfig(input=str(inp), output=str(root / out), progress=False)
        for key, value in kw.items():
            setattr(c, key, value)
        return run(c)

    return {
        "root": root,
        "plants": plants,
        "one": dedup("one.jsonl", tasks=1),
        "three": dedup("three", tasks=3, workers=2),
        "off": dedup("off.jsonl", tasks=1, exact=False),
    }


def test_planted_copies_differ_only_in_what_clean_normalises(corpus):
    clean = Cleaner(CleanConfig(input="-", output="-"))
    for src_doc, _, _, v in corpus["plants"]:
        variant = VARIANTS[v](src_doc["text"])
        assert variant != src_doc["text"]
        assert clean(variant) == clean(src_doc["text"])


def test_exact_copies_are_removed_before_minhash_keeping_the_first_for_any_split(corpus):
    one, three, off = corpus["one"], corpus["three"], corpus["off"]
    root = corpus["root"]
    assert three["tasks"]["signatures"] == 3 and three["tasks"]["exact"] == 1
    assert parts_bytes(root / "three") == (root / "one.jsonl").read_bytes()
    kept = [json.loads(line)["id"] for line in open(root / "one.jsonl", encoding="utf-8")]
    assert not [i for i in kept if i.startswith("exact-") or i == "near"]
    assert {"f0-0", "f0-1", "f1-1"} <= set(kept)  # the first copy of each in input order
    for r in (one, three):
        assert (r["exact_duplicates"], r["near_duplicates"], r["docs_removed"]) == (3, 1, 4)
        # The exact copies never reached the buckets: the one candidate pair is the near one.
        assert r["candidate_pairs"] == 1 and r["verified_pairs"] == 1
    # Without the pass MinHash removes the same documents, after pairing every exact copy.
    assert (root / "off.jsonl").read_bytes() == (root / "one.jsonl").read_bytes()
    assert off["tasks"]["exact"] == 0  # the step did not run
    assert off["exact_duplicates"] == 0 and off["near_duplicates"] == 4
    assert off["candidate_pairs"] == 5  # 3 among base_a's copies, 1 for base_b's, the near one


def test_report_counts_removals_by_source_and_cross_source_duplicates(corpus):
    for r in (corpus["one"], corpus["three"]):
        # removed: exact a (same source), exact b (kept a), exact none (kept b), near a (kept b)
        assert r["removed_by_source"] == {"(none)": 1, "a": 2, "b": 1}
        assert r["cross_source_duplicates"] == 3
        assert r["by_kind"]["exact"] == {
            "removed_by_source": {"(none)": 1, "a": 1, "b": 1},
            "cross_source_duplicates": 2,
        }
        assert r["by_kind"]["near"] == {
            "removed_by_source": {"a": 1},
            "cross_source_duplicates": 1,
        }
    # exact=false: the same removals, all counted as near duplicates
    assert corpus["off"]["removed_by_source"] == corpus["one"]["removed_by_source"]
    assert corpus["off"]["cross_source_duplicates"] == 3
