"""Word n-grams of a text as 64-bit hashes, the evaluation n-gram index, and one document's
matches against it.

The word rule (the same for evaluation texts and corpus documents): a word is a maximal run
of Unicode letters and digits (`[^\\W_]+`: what `str.isalnum` accepts), lower-cased with
`str.lower`; everything else (whitespace, punctuation, underscore, symbols) only separates
words. So "The U.S.A.'s  Flag_day" is the words `the u s a s flag day`, and case, punctuation
and line breaks never hide an overlap, as in GPT-3's and lm-eval's decontamination (both
lower-case and drop punctuation). Text is not Unicode-normalised: NFC and NFD spellings of
an accented word differ.

An n-gram's hash is a polynomial over its words' hashes, sum(w[j] * B^(n-1-j)) mod 2^64, with
each word hashed once by BLAKE2b (8 bytes): the same on every process and machine (Python's
`hash` is salted per process), and n multiply-adds per position in numpy. A false match needs
two distinct n-grams with one hash: about (eval n-grams x corpus n-grams) / 2^64, below 1e-6
for 1e7 evaluation n-grams against 1e12 corpus n-grams.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

WORD = re.compile(r"[^\W_]+")
INDEX_BYTES_PER_NGRAM = 12  # its uint64 hash and the int32 number of its set of tasks
_B = np.uint64(0x9E3779B97F4A7C15)  # odd, so every power is invertible mod 2^64
# Word hashes kept per process; a corpus repeats its vocabulary, so most words hit the cache.
_CACHE_MAX = 1 << 20
_word_hashes: dict[str, int] = {}


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (the rule above)."""
    if text.isascii():  # ASCII lower-casing keeps every character a letter or not: one pass
        return WORD.findall(text.lower())
    return [w.lower() for w in WORD.findall(text)]


def word_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) character offsets of `words(text)`, in the same order."""
    return [m.span() for m in WORD.finditer(text)]


def word_hash(word: str) -> int:
    """64-bit hash of one lower-cased word."""
    h = _word_hashes.get(word)
    if h is None:
        if len(_word_hashes) >= _CACHE_MAX:
            _word_hashes.clear()
        raw = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        h = _word_hashes[word] = int.from_bytes(raw, "little")
    return h


def ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """The hash of every n-gram of the lower-cased words `tokens`, by start position
    (uint64, len(tokens) - n + 1 of them; none when there are fewer than n words)."""
    m = len(tokens) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    get = _word_hashes.get  # the cache inline: a call per word costs more than the lookup
    hs = [get(t) for t in tokens]
    if None in hs:
        hs = [word_hash(t) if h is None else h for h, t in zip(hs, tokens, strict=True)]
    w = np.array(hs, dtype=np.uint64)
    h = w[:m].copy()
    for j in range(1, n):
        h *= _B  # wraps mod 2^64: numpy arrays do not check integer overflow
        h += w[j : j + m]
    return h


def text_ngrams(text: str, n: int) -> tuple[list[str], np.ndarray]:
    """The words of `text` and the hashes of its n-grams by start position."""
    tokens = words(text)
    return tokens, ngram_hashes(tokens, n)


@dataclass
class Match:
    """One document's overlap with the evaluation texts: per task, the distinct evaluation
    n-grams it holds (`distinct`), the positions holding one (`hits`), and the start positions
    (word index) of its matching n-grams (`starts`)."""

    distinct: dict[int, int]
    hits: dict[int, int]
    starts: dict[int, np.ndarray]


class NgramIndex:
    """The evaluation n-grams: `hashes` (sorted, unique uint64) and, for each, `sets[i]`, the
    index of the set of tasks whose texts hold it (`task_sets[k]`, a tuple of task numbers).
    8 bytes per n-gram plus 4 for its set; shared read-only by every task of a run."""

    def __init__(self, hashes: np.ndarray, sets: np.ndarray, task_sets: list[tuple[int, ...]]):
        self.hashes, self.sets, self.task_sets = hashes, sets, task_sets

    @classmethod
    def build(cls, per_task: list[np.ndarray]) -> NgramIndex:
        """From each task's n-gram hashes (task number = position in the list)."""
        if not per_task or not sum(len(h) for h in per_task):
            return cls(np.empty(0, np.uint64), np.empty(0, np.int32), [])
        hashes = np.concatenate(per_task)
        owner = np.concatenate([np.full(len(h), t, np.int32) for t, h in enumerate(per_task)])
        pairs = np.unique(np.stack([hashes, owner.astype(np.uint64)], axis=1), axis=0)
        uniq, first = np.unique(pairs[:, 0], return_index=True)
        bounds = [*first.tolist(), len(pairs)]
        table: dict[tuple[int, ...], int] = {}
        sets = np.empty(len(uniq), np.int32)
        for i in range(len(uniq)):
            key = tuple(int(t) for t in pairs[bounds[i] : bounds[i + 1], 1])
            sets[i] = table.setdefault(key, len(table))
        return cls(uniq, sets, list(table))

    def match(self, hashes: np.ndarray) -> Match | None:
        """Which tasks' n-grams the document with these n-gram hashes holds; None: none."""
        if not len(hashes) or not len(self.hashes):
            return None
        idx = np.searchsorted(self.hashes, hashes)
        idx[idx == len(self.hashes)] = 0
        found = self.hashes[idx] == hashes
        if not found.any():
            return None
        starts = np.flatnonzero(found)
        where = idx[starts]
        distinct: dict[int, int] = {}
        hits: dict[int, int] = {}
        pos: dict[int, list[np.ndarray]] = {}
        for s in np.unique(self.sets[where]):
            sel = self.sets[where] == s
            n_distinct = len(np.unique(where[sel]))
            for t in self.task_sets[int(s)]:
                distinct[t] = distinct.get(t, 0) + n_distinct
                hits[t] = hits.get(t, 0) + int(sel.sum())
                pos.setdefault(t, []).append(starts[sel])
        return Match(distinct, hits, {t: np.sort(np.concatenate(p)) for t, p in pos.items()})


def masked(
    text: str, starts: np.ndarray, n: int, mask_with: str, window: int = 0, min_piece: int = 0
) -> tuple[str, int, int, bool]:
    """`text` with its matching n-grams (words starts[i] .. starts[i] + n - 1) cut out: each
    run of overlapping or adjacent n-grams, from its first word's first character to its last
    word's last character, widened by `window` characters each side; cuts that then overlap
    are one; a piece of text between cuts (or before the first, after the last) shorter than
    `min_piece` characters goes with them. Each cut is replaced by `mask_with`. Returns (text,
    cuts, characters cut, whether a word is left outside the cuts)."""
    ws = word_spans(text)
    runs: list[list[int]] = []
    for s in starts.tolist():
        if runs and s <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], s + n - 1)
        else:
            runs.append([s, s + n - 1])
    cuts: list[list[int]] = []
    for a, b in runs:
        lo, hi = max(ws[a][0] - window, 0), min(ws[b][1] + window, len(text))
        if cuts and lo - cuts[-1][1] < max(min_piece, 1):
            cuts[-1][1] = max(cuts[-1][1], hi)
        else:
            cuts.append([lo, hi])
    if 0 < cuts[0][0] < min_piece:
        cuts[0][0] = 0
    if 0 < len(text) - cuts[-1][1] < min_piece:
        cuts[-1][1] = len(text)
    out, prev, chars, left = [], 0, 0, False
    for lo, hi in cuts:
        left = left or WORD.search(text, prev, lo) is not None
        out += [text[prev:lo], mask_with]
        chars += hi - lo
        prev = hi
    left = left or WORD.search(text, prev) is not None
    out.append(text[prev:])
    return "".join(out), len(cuts), chars, left
