"""Whitespace normalisation and boilerplate removal, one document at a time (streaming).

Boilerplate repeated across documents (Project Gutenberg licence headers and footers, bare
"Chapter One" heading lines, site-specific lines matched by user rules) wastes tokens and, worse,
makes unrelated documents look alike to the MinHash dedup that follows. Whitespace is normalised
last so that the blank lines a removal leaves behind are collapsed too.

Every rule counts what it did (lines, runs or documents) in the report; a document left empty
is counted and its id listed in the report rather than written out (downstream stages reject
empty texts). Bad input lines go to the rejects file as in `data_pipeline.io.read_documents`.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from data_pipeline.cli import rejects_path, stage_main, to_container, write_report
from data_pipeline.io import AtomicWriter, Rejects, read_documents

# Line breaks other than \n: CRLF/CR (Windows/old Mac), VT, FF, NEL, LS, PS. CRLF first, so it
# becomes one \n, not two. Plain `in`/`replace` scans are ~100x faster than a regex class here.
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
class CleanConfig:
    input: Any = MISSING
    output: str = MISSING
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


def run(cfg: CleanConfig) -> dict:
    """Clean every document of `input` into `output`; returns the stage report."""
    t0 = time.perf_counter()
    clean = Cleaner(cfg)
    out_path = Path(cfg.output)
    for stale in out_path.parent.glob(f".{out_path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    rpath = rejects_path(out_path)
    rpath.unlink(missing_ok=True)
    rejects = Rejects(rpath)
    n_in = n_out = changed = chars_in = chars_out = 0
    empty_ids: list[str] = []
    n_empty = 0
    try:
        with AtomicWriter(out_path) as out:
            for doc in read_documents(cfg.input, rejects):
                n_in += 1
                text = doc["text"]
                new = clean(text)
                chars_in += len(text)
                if new != text:
                    changed += 1
                if not new.strip():
                    n_empty += 1
                    if len(empty_ids) < _MAX_EMPTY_IDS:
                        empty_ids.append(doc["id"])
                    continue
                chars_out += len(new)
                doc["text"] = new
                out.write_doc(doc)
                n_out += 1
    finally:
        rejects.close()
    secs = time.perf_counter() - t0
    report = {
        "stage": "clean",
        "output": str(out_path),
        "docs_in": n_in,
        "docs_out": n_out,
        "docs_changed": changed,
        "empty_after_cleaning": n_empty,
        "empty_after_cleaning_ids": empty_ids,
        "chars_in": chars_in,
        "chars_out": chars_out,
        "rules": dict(sorted(clean.counts.items())),
        "seconds": round(secs, 3),
        "docs_per_s": round(n_in / secs, 1) if secs > 0 else 0.0,
        "config": to_container(cfg),
        "rejects": rejects.report(),
    }
    write_report(out_path, report)
    return report


def main() -> None:
    stage_main("clean", CleanConfig, run)


if __name__ == "__main__":
    main()
