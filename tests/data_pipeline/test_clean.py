"""The clean stage: whitespace normalisation and boilerplate removal with per-rule counts, empty
results counted, bad input rejected with file:line, atomic output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.documents import Rejects, read_documents
from data_pipeline.runtime.cli import EXIT_FAILED, EXIT_OK, EXIT_REJECTS, rejects_path
from data_pipeline.stages.clean import CleanConfig, Cleaner, run
from tests.data_pipeline.test_reddit import parts_bytes

from .conftest import assert_no_stage_processes

REPO = Path(__file__).resolve().parents[2]

# The shape of a current Project Gutenberg file (licence text abridged).
GUTENBERG = """\ufeffThe Project Gutenberg eBook of A Small Tale\r
\r
This ebook is for the use of anyone anywhere in the United States and\r
most other parts of the world at no cost and with almost no restrictions\r
whatsoever.\r
\r
Title: A Small Tale\r
Author: Nobody in Particular\r
\r
*** START OF THE PROJECT GUTENBERG EBOOK A SMALL TALE ***\r
\r
\r
\r
CHAPTER I.\r
\r
It was a quiet morning   in the village.  \r
\r
\r
\r
\r
Chapter Two\r
\r
Nothing happened, which suited everyone.\r
\r
*** END OF THE PROJECT GUTENBERG EBOOK A SMALL TALE ***\r
\r
Updated editions will replace the previous one--the old editions will\r
be renamed.\r
"""
GUTENBERG_CLEAN = (
    "It was a quiet morning in the village.\n\nNothing happened, which suited everyone."
)

OLD_GUTENBERG = """The Project Gutenberg Etext of Another Tale
**Welcome To The World of Free Plain Vanilla Electronic Texts**
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

Once upon a time.

End of the Project Gutenberg Etext of Another Tale
"""


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"text": t, "id": f"d{i}"}) + "\n" for i, t in enumerate(texts))
    )
    return path


def clean_text(text: str, **kw) -> tuple[str, dict]:
    c = Cleaner(CleanConfig(input="-", output="-", **kw))
    return c(text), {k: v for k, v in c.counts.items() if v}


def test_gutenberg_header_footer_and_chapter_lines_removed():
    text, counts = clean_text(GUTENBERG)
    assert text == GUTENBERG_CLEAN
    assert counts["gutenberg_header"] == 1
    assert counts["gutenberg_footer"] == 1
    assert counts["chapter_headings"] == 2


def test_old_style_gutenberg_small_print_header_and_end_line():
    text, counts = clean_text(OLD_GUTENBERG)
    assert text == "Once upon a time."
    assert counts["gutenberg_header"] == counts["gutenberg_footer"] == 1


@pytest.mark.parametrize(
    "line",
    ["Chapter One", "CHAPTER XII.", "Chapter 3", "BOOK II", "Part Twenty-One", "Book the First:"],
)
def test_heading_only_lines_are_removed(line):
    assert clean_text(f"Before.\n{line}\nAfter.") == (
        "Before.\nAfter.",
        {"chapter_headings": 1},
    )


@pytest.mark.parametrize(
    "line", ["Chapter one was the best.", "Part mid", "The book two of us read", "Chapter"]
)
def test_prose_that_mentions_chapters_is_kept(line):
    text, counts = clean_text(f"Before.\n{line}\nAfter.")
    assert text == f"Before.\n{line}\nAfter."
    assert counts.get("chapter_headings", 0) == 0


def test_whitespace_rules_each_counted():
    raw = "a  b\t\tc \r\nd\u2028e\r\n\n\n\n f   \n\n  \ng"
    text, counts = clean_text(raw)
    assert text == "a b c\nd\ne\n\n f\n\ng"
    assert counts == {
        "normalize_newlines": 3,  # \r\n, \u2028, \r\n
        "strip_trailing_spaces": 3,  # "c ", "f   ", "  "
        "collapse_spaces": 2,  # "  ", "\t\t"
        "max_blank_lines": 2,  # three blank lines after e; two after f once "  " is stripped
    }


def test_whitespace_rules_can_be_switched_off():
    raw = "a  b \r\n\n\n\nc"
    assert (
        clean_text(
            raw,
            normalize_newlines=False,
            collapse_spaces=False,
            strip_trailing_spaces=False,
            max_blank_lines=-1,
            chapter_headings=False,
            gutenberg=False,
        )[0]
        == raw
    )
    assert clean_text(raw, max_blank_lines=0)[0] == "a b\nc"
    assert clean_text(raw, max_blank_lines=2)[0] == "a b\n\n\nc"


def test_user_regex_rules_remove_whole_lines_and_count_by_name():
    raw = "Keep me.\nADVERTISEMENT\nShare this article on Facebook\nKeep me too.\nADVERTISEMENT"
    text, counts = clean_text(raw, rules={"ads": r"^ADVERTISEMENT$", "share": r"(?i)share this"})
    assert text == "Keep me.\nKeep me too."
    assert counts["rule:ads"] == 2 and counts["rule:share"] == 1


def test_stage_counts_empty_results_and_keeps_ids_and_meta(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        json.dumps({"text": GUTENBERG, "id": "book", "meta": {"src": "pg"}})
        + "\n"
        + json.dumps({"text": "Chapter One\n\n   \n", "id": "only-heading"})
        + "\n"
        + json.dumps({"text": "Already clean.", "id": "clean"})
        + "\n"
    )
    out = tmp_path / "out.jsonl.zst"
    report = run(CleanConfig(input=str(inp), output=str(out)))
    docs = list(read_documents(out, Rejects(None)))
    assert docs == [
        {"text": GUTENBERG_CLEAN, "id": "book", "meta": {"src": "pg"}},
        {"text": "Already clean.", "id": "clean", "meta": {}},
    ]
    assert report["docs_in"] == 3 and report["docs_out"] == 2 and report["docs_changed"] == 2
    assert report["empty_after_cleaning"] == 1
    assert report["empty_after_cleaning_ids"] == ["only-heading"]
    assert report["rules"]["chapter_headings"] == 3
    assert report["rejects"]["total"] == 0


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.clean", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_lines_rejected_with_file_line_and_exit_3(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(
        b'{"text": "fine  text", "id": "a"}\n'
        b'{"text": "broken\n'
        b'{"text": "caf\xe9"}\n'
        b'{"id": "no-text"}\n'
        b'{"text": "   "}\n'
        b'{"text": "also fine", "id": "b"}\n'
    )
    out = tmp_path / "out.jsonl"
    res = cli(f"input={inp}", f"output={out}")
    assert res.returncode == EXIT_REJECTS, res.stderr
    rej = [json.loads(x) for x in rejects_path(out).read_text().splitlines()]
    assert [(r["line"], r["reason"].split(" (")[0]) for r in rej] == [
        (2, "invalid json"),
        (3, "invalid utf-8"),
        (4, "missing field 'text'"),
        (5, "empty text"),
    ]
    assert all(r["file"] == str(inp) for r in rej)
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == [
        "fine text",
        "also fine",
    ]


def test_clean_input_exits_0_and_invalid_rule_exits_1(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", ["one", "two"])
    assert cli(f"input={inp}", f"output={tmp_path / 'o.jsonl'}").returncode == EXIT_OK
    res = cli(f"input={inp}", f"output={tmp_path / 'p.jsonl'}", "+rules.bad=(unclosed")
    assert res.returncode == EXIT_FAILED
    assert "rules.bad" in res.stderr and not (tmp_path / "p.jsonl").exists()


@pytest.mark.slow
def test_killed_stage_leaves_no_output_and_rerun_matches(tmp_path):
    texts = [f"Chapter {i}\n\nParagraph  {i}   of text.  \n\n\n\n" * 40 for i in range(5_000)]
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    ref = tmp_path / "ref.jsonl"
    run(CleanConfig(input=str(inp), output=str(ref)))
    out = tmp_path / "o.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.clean", f"input={inp}", f"output={out}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its group holds every process it starts
    )
    deadline = time.monotonic() + 60
    parts = tmp_path / ".o.jsonl.work" / "parts"  # killed while the task writes its part
    while (
        not any(parts.glob(".part-00000.jsonl.zst.tmp-*"))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert_no_stage_processes(proc.pid)  # none outlives the driver
    assert not out.exists()
    assert cli(f"input={inp}", f"output={out}").returncode == EXIT_OK
    assert out.read_bytes() == ref.read_bytes()
    assert not list(tmp_path.glob(".o.jsonl.tmp-*"))


@pytest.mark.parametrize(
    "raw, want",
    [
        ("a\tb  c", "a b c"),  # ASCII with a tab: the class path
        ("a  b   c", "a b c"),  # plain ASCII: the literal fast path
        ("caf\u00e9\u00a0\u00a0au\u2003lait  x", "caf\u00e9 au lait x"),  # Unicode spaces
    ],
)
def test_each_horizontal_whitespace_run_becomes_one_space(raw, want):
    assert clean_text(raw)[0] == want


def test_three_tasks_on_two_workers_give_one_tasks_bytes_counts_and_rejects(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(3):
        texts = [f"Chapter {i}\n\nFile {k}, text  {i}.  \n\n\n" for i in range(50)]
        write_jsonl(d / f"f{k}.jsonl", texts)
        with open(d / f"f{k}.jsonl", "a") as f:
            f.write('{"text": ""}\nnot json\n')
    one = run(CleanConfig(input=str(d), output=str(tmp_path / "one.jsonl"), tasks=1))
    three = run(CleanConfig(input=str(d), output=str(tmp_path / "three"), tasks=3, workers=2))
    assert (one["tasks"], three["tasks"]) == (1, 3)
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == [
        f"part-0000{k}.jsonl.zst" for k in range(3)
    ]
    assert parts_bytes(tmp_path / "three") == (tmp_path / "one.jsonl").read_bytes()
    for k in ("docs_in", "docs_out", "docs_changed", "rules", "rejects", "chars_out"):
        assert three[k] == one[k], k
    assert three["rejects"]["total"] == 6
    assert (
        rejects_path(tmp_path / "three").read_text()
        == rejects_path(tmp_path / "one.jsonl").read_text()
    )
