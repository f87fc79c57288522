"""Whitespace normalisation and boilerplate removal, one document at a time (streaming).

Boilerplate repeated across documents (Project Gutenberg licence headers and footers, bare
"Chapter One" heading lines, site-specific lines matched by user rules) wastes tokens and, worse,
makes unrelated documents look alike to the MinHash dedup that follows. Whitespace is normalised
last so that the blank lines a removal leaves behind are collapsed too.

The stage runs as tasks (data_pipeline.runtime.scaleout), each cleaning a contiguous share of the
input files into its part; the output is the same bytes for any split. Every rule counts what it did
(lines, runs or documents) in the report; a document left empty is counted and its id listed in the
report rather than written out (downstream stages reject empty texts). Bad input lines go to the
rejects file as in `data_pipeline.documents.read_documents`.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from data_pipeline.config_limits import Range, check_limits
from data_pipeline.documents import (
    AtomicWriter,
    InputLimits,
    Rejects,
    read_documents,
)
from data_pipeline.files import publish_file, temporary_beside
from data_pipeline.runtime import executors, scaleout
from data_pipeline.runtime.cli import rejects_path, stage_main, to_container, write_report
from data_pipeline.runtime.plan import StagePlan

# Line breaks other than \n: CRLF/CR (Windows/old Mac), VT, FF, NEL, LS, PS. CRLF first, so it
# becomes one \n, not two. Plain `in`/`replace` scans: `str.replace` searches for a literal with
# a fast substring search, while a regex character class tests every character in the engine.
_NEWLINES = ("\r\n", "\r", "\x0b", "\x0c", "\x85", "\u2028", "\u2029")
# Horizontal whitespace (everything \s matches except \n). Regexes that start with a character
# class scan slowly in `re`, so ASCII text without tabs/control spaces takes the literal path.
_SPACE_RUNS = re.compile(r"[^\S\n]{2,}|[^\S\n ]")
_SPACE_RUNS_ASCII = re.compile(r"  +")
_ASCII_ODD_SPACES = ("\t", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")

# Gutenberg: everything up to and including the START line is licence header; everything from
# the END line on is licence footer. Old (pre-2000s) texts end their header with the
# "*END*THE SMALL PRINT!" line and their body with "End of (the) Project Gutenberg('s) ...".
_GUTENBERG_START = re.compile(
    r"^[^\S\n]*(?:\*{3}[^\S\n]*START OF (?:THE |THIS )?PROJECT GUTENBERG E-?BOOK"
    r"|\*END\*THE SMALL PRINT!)[^\n]*\n?",
    re.I | re.M,
)
_GUTENBERG_END = re.compile(
    r"^[^\S\n]*(?:\*{3}[^\S\n]*END OF (?:THE |THIS )?PROJECT GUTENBERG E-?BOOK"
    r"|End of (?:the )?Project Gutenberg(?:'s)?[^\S\n])",
    re.I | re.M,
)
_UNITS = "one|two|three|four|five|six|seven|eight|nine"
_NUMBER = (
    r"(?:(?-i:[IVXLCDM]+)|\d+"
    rf"|(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)(?:[- ](?:{_UNITS}))?"
    rf"|{_UNITS}|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen"
    r"|nineteen|hundred|first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last)"
)
# A line that is only a heading: "Chapter One", "CHAPTER XII.", "Book 3:", "Part Twenty-One".
# Roman numerals are matched upper-case only, so "Part mid" (a word) is not a heading.
_CHAPTER = re.compile(
    rf"^[^\S\n]*(?:chapter|book|part|section|volume)[^\S\n]+(?:the[^\S\n]+)?{_NUMBER}"
    r"[^\S\n]*[.:]?[^\S\n]*(?:\n|$)",
    re.I | re.M,
)
_MAX_EMPTY_IDS = 1000


@dataclass
class CleanConfig(scaleout.ScaleOut):
    """Keys of `python -m data_pipeline.clean` (docs/data-reddit-clean.md); the scale-out keys
    (tasks, workers, executor, slurm) are data_pipeline.runtime.scaleout's."""

    input: Any = MISSING
    output: str = MISSING
    # The parent of this stage's private opt-train-clean.work/ (data_pipeline/ownership.py); unset:
    # .<output name>.work beside the output. Nothing else in it is ever removed.
    work_dir: str | None = None
    keep_work: bool = False
    normalize_newlines: bool = True
    strip_trailing_spaces: bool = True
    collapse_spaces: bool = True
    # At most this many consecutive blank lines survive; -1 keeps them all.
    max_blank_lines: int = 1
    strip_document: bool = True
    gutenberg: bool = True
    chapter_headings: bool = True
    # name -> regex; every line in which the regex matches (re.search) is removed.
    rules: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_limits(self, "", {"max_blank_lines": Range(0, also=(-1,))})


class Cleaner:
    """The configured rules as one callable; `counts` accumulates what each rule removed."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.counts: Counter = Counter()
        self.rules = []
        for name, pattern in cfg.rules.items():
            try:
                self.rules.append((f"rule:{name}", re.compile(pattern)))
            except re.error as e:
                raise ValueError(f"rules.{name}={pattern!r} is not a valid regex: {e}") from e
        n = cfg.max_blank_lines
        self.blank = re.compile(rf"\n(?:[^\S\n]*\n){{{n + 1},}}") if n >= 0 else None
        self.blank_to = "\n" * (n + 1) if n >= 0 else ""

    def __call__(self, text: str) -> str:
        cfg, c = self.cfg, self.counts
        if cfg.normalize_newlines:
            k = 0
            for nl in _NEWLINES:
                if nl in text:
                    k += text.count(nl)
                    text = text.replace(nl, "\n")
            c["normalize_newlines"] += k
        if cfg.gutenberg and ("utenberg" in text or "UTENBERG" in text):
            m = _GUTENBERG_START.search(text)
            if m:
                text = text[m.end() :]
                c["gutenberg_header"] += 1
            m = _GUTENBERG_END.search(text)
            if m:
                text = text[: m.start()]
                c["gutenberg_footer"] += 1
        if cfg.chapter_headings:
            text, k = _CHAPTER.subn("", text)
            c["chapter_headings"] += k
        if self.rules:
            lines = text.split("\n")
            for name, rx in self.rules:
                kept = [line for line in lines if not rx.search(line)]
                c[name] += len(lines) - len(kept)
                lines = kept
            text = "\n".join(lines)
        if cfg.strip_trailing_spaces:
            lines = text.split("\n")
            stripped = [line.rstrip() for line in lines]
            c["strip_trailing_spaces"] += sum(
                len(a) != len(b) for a, b in zip(lines, stripped, strict=True)
            )
            text = "\n".join(stripped)
        if cfg.collapse_spaces:
            fast = text.isascii() and not any(ch in text for ch in _ASCII_ODD_SPACES)
            text, k = (_SPACE_RUNS_ASCII if fast else _SPACE_RUNS).subn(" ", text)
            c["collapse_spaces"] += k
        if self.blank is not None:
            text, k = self.blank.subn(self.blank_to, text)
            c["max_blank_lines"] += k
        if cfg.strip_document:
            text = text.strip()
        return text


class _Plan(StagePlan):
    """The run's input files and shares (StagePlan), with the rules checked up front."""

    stage = "clean"

    def __init__(self, cfg: CleanConfig):
        Cleaner(cfg)  # refuses a bad rule before any work
        super().__init__(cfg)
        self.share_files()

    def fingerprint(self) -> dict:
        params = {k: v for k, v in to_container(self.cfg).items() if k in _OUTPUT_PARAMS}
        return {"files": self.files_fingerprint(), "tasks": self.tasks, **params}


# The keys that decide what is written (the rest: where, and how it runs).
_OUTPUT_PARAMS = (
    "normalize_newlines",
    "strip_trailing_spaces",
    "collapse_spaces",
    "max_blank_lines",
    "strip_document",
    "gutenberg",
    "chapter_headings",
    "rules",
    "max_line_bytes",
    "max_rejects",
    "reject_text_bytes",
)


class CleanShare(scaleout.TaskStep):
    """Task r cleans the documents of its contiguous share of the input files into part r."""

    name = "clean"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        lo, hi = plan.shares[rank]
        clean = Cleaner(plan.cfg)
        part = plan.part(rank)
        scaleout.remove_stale(part.parent, f".{part.name}.tmp-*")  # of a killed attempt
        final = scaleout.task_file(self.work, self.name, rank, ".rejects.jsonl")
        tmp = temporary_beside(final)
        rejects = Rejects(tmp, InputLimits.of(self.cfg))
        st: Counter = Counter()
        empty_ids: list[str] = []
        files = plan.files[lo:hi]
        total = sum(f.stat().st_size for f in files)
        bar = scaleout.progress(plan.cfg, f"clean task {rank}/{world_size}", total)
        try:
            with AtomicWriter(part) as out, bar:
                for doc in read_documents(files, rejects, bar):
                    st["docs_in"] += 1
                    text = doc["text"]
                    new = clean(text)
                    st["chars_in"] += len(text)
                    st["docs_changed"] += new != text
                    if not new.strip():
                        st["empty_after_cleaning"] += 1
                        if len(empty_ids) < _MAX_EMPTY_IDS:
                            empty_ids.append(doc["id"])
                        continue
                    st["chars_out"] += len(new)
                    doc["text"] = new
                    out.write_doc(doc)
                    st["docs_out"] += 1
        finally:
            rejects.close()
        if tmp.exists():
            publish_file(tmp, final)
        return {
            **st,
            "rules": dict(clean.counts),
            "empty_ids": empty_ids,
            "rejects": rejects.report(),
        }


class CleanReport(scaleout.TaskStep):
    """One task: the report (every task's counts summed), the rejects in input order, and the
    parts published as the output."""

    name = "report"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        st = scaleout.task_stats(self.work, "clean", plan.tasks)
        rejects = scaleout.gather_rejects(
            [
                scaleout.task_file(self.work, "clean", r, ".rejects.jsonl")
                for r in range(plan.tasks)
            ],
            [t["rejects"] for t in st],
            rejects_path(plan.out),
        )
        scaleout.finish_parts([plan.part(r) for r in range(plan.tasks)], plan.out, plan.to_file)
        rules: Counter = Counter()
        for t in st:
            rules.update(t["rules"])
        keys = ("docs_in", "docs_out", "docs_changed", "empty_after_cleaning")
        report = {
            "stage": "clean",
            "output": str(plan.out),
            "tasks": plan.tasks,
            **{k: sum(t.get(k, 0) for t in st) for k in (*keys, "chars_in", "chars_out")},
            "empty_after_cleaning_ids": [i for t in st for i in t["empty_ids"]][:_MAX_EMPTY_IDS],
            "rules": dict(sorted(rules.items())),
            "cpu_s": round(sum(t["cpu_s"] for t in st), 3),
            "config": to_container(plan.cfg),
            "rejects": rejects.report(),
        }
        write_report(plan.out, report)
        return {"docs_out": report["docs_out"]}


def run(cfg: CleanConfig) -> dict:
    """Clean every document of `input` into `output` (tasks over shares of the input files,
    data_pipeline.runtime.scaleout); returns the stage report (with slurm.wait=false, the job
    ids)."""
    t0 = time.perf_counter()
    scaleout.validate(cfg)
    plan = _Plan(cfg)
    with scaleout.owned(plan, "clean"):
        scaleout.prepare(plan, [("clean", plan.fingerprint()), ("report", {})])
        steps = [(CleanShare(plan), plan.tasks), (CleanReport(plan), 1)]
        jobs = executors.run_steps(steps, cfg, plan.work)
        return scaleout.finish("clean", plan, jobs, t0, "docs_in", "docs_per_s")


def main() -> None:
    # Through the module's import name, not __main__: the executors pickle the steps, and a
    # class of __main__ would be pickled by value, without the module's other names.
    from data_pipeline.stages import clean

    stage_main("clean", clean.CleanConfig, clean.run)


if __name__ == "__main__":
    main()
