"""Pushshift-format Reddit dumps with known answers, for the reddit stage's tests and benchmark.

Two kinds of dump:
- `scenarios()`: hand-built threads, each one a fact the stage must get right (threads across
  months, equal-length branches, deleted comments mid-chain, orphans, deep chains, filters), with
  the expected chain written down by construction, not computed by the code under test.
- `write_random_dump()`: random comment trees at any size (millions of comments, streamed to
  disk), whose answers come from `brute_force_chain`, an independent oracle that enumerates every
  root-to-leaf path.

Files are written as Pushshift does: `RS_YYYY-MM.zst` (submissions) and `RC_YYYY-MM.zst`
(comments), zstd-compressed NDJSON ordered by created_utc, one file per calendar month.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

BASE = 1577836800  # 2020-01-01T00:00:00Z
DAY = 86400
# Extra Pushshift fields real dumps carry, so that parsing costs what it costs on real data.
_EXTRA_COMMENT = {
    "gilded": 0,
    "distinguished": None,
    "edited": False,
    "controversiality": 0,
    "author_flair_text": None,
    "author_flair_css_class": None,
    "stickied": False,
    "is_submitter": False,
    "retrieved_on": 1600000000,
    "subreddit_id": "t5_2qh1i",
    "permalink": "/r/AskReddit/comments/xxxxxx/",
}
_EXTRA_SUBMISSION = {
    "num_comments": 0,
    "over_18": False,
    "is_self": True,
    "url": "",
    "domain": "self.AskReddit",
    "retrieved_on": 1600000000,
    "subreddit_id": "t5_2qh1i",
}


def month_of(ts: int) -> str:
    return time.strftime("%Y-%m", time.gmtime(ts))


@dataclass
class Thread:
    """One thread and its known answers: the comment ids of the longest chain without filters
    and with Roller et al.'s filters (`filters.enabled=true`, defaults)."""

    key: str
    submission: dict | None
    comments: list[dict] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    expected_filtered: list[str] | None = None
    name: str = ""

    def text(self, chain: list[str], sep: str = "\n\n") -> str:
        by_id = {c["id"]: c for c in self.comments}
        parts = []
        if self.submission is not None:
            parts += [
                p
                for p in (self.submission["title"], self.submission["selftext"])
                if p and p not in ("[deleted]", "[removed]")
            ]
        parts += [by_id[i]["body"] for i in chain]
        return sep.join(parts)


class _Builder:
    """Builds one thread; ids are fixed-width so that 'smaller id' is also string order."""

    counter = 0

    def __init__(self, name: str, t0: int, orphan: bool = False, subreddit: str = "AskReddit"):
        _Builder.counter += 1
        self.key = f"s{_Builder.counter:05d}"
        self.t0 = t0
        self.subreddit = subreddit
        sub = None
        if not orphan:
            sub = {
                "id": self.key,
                "title": f"Title of {name}",
                "selftext": f"Self text of {name}.",
                "author": "op_user",
                "created_utc": t0,
                "score": 10,
                "subreddit": subreddit,
            }
        self.thread = Thread(self.key, sub, name=name)
        self.n = 0

    def add(
        self,
        parent: str | None,
        body: str | None = None,
        score: int = 1,
        dt: int | None = None,
        author: str | None = None,
        cid: str | None = None,
    ) -> str:
        self.n += 1
        cid = cid or f"{self.key}c{self.n:04d}"
        self.thread.comments.append(
            {
                "id": cid,
                "parent_id": f"t1_{parent}" if parent else f"t3_{self.key}",
                "link_id": f"t3_{self.key}",
                "body": body if body is not None else f"Comment {cid} says something useful.",
                "author": author or f"user_{self.n}",
                "created_utc": self.t0 + (dt if dt is not None else 60 * self.n),
                "score": score,
                "subreddit": self.subreddit,
            }
        )
        return cid

    def chain(self, parent: str | None, n: int, **kw) -> list[str]:
        ids = []
        for _ in range(n):
            parent = self.add(parent, **kw)
            ids.append(parent)
        return ids

    def done(self, expected: list[str], expected_filtered: list[str] | None = None) -> Thread:
        self.thread.expected = expected
        if expected_filtered is None:
            expected_filtered = expected[:7]
        self.thread.expected_filtered = expected_filtered
        return self.thread


def scenarios() -> list[Thread]:
    """The hand-built threads; each builder block states the fact it checks."""
    _Builder.counter = 0
    out = []
    t = BASE + 10 * DAY

    # A longest chain among shorter side branches and a shorter second root.
    b = _Builder("simple", t)
    main = b.chain(None, 4)
    b.add(main[0])
    b.chain(main[1], 1)
    b.chain(None, 3)
    out.append(b.done(main))

    # A thread spanning two monthly files: the winning branch continues in February.
    b = _Builder("across months", BASE + 31 * DAY - 3600)  # 2020-01-31 23:00
    r = b.add(None, dt=600)
    b.chain(r, 1, dt=1200)  # short branch, all January
    b1 = b.add(r, dt=1800)  # January
    b2 = b.add(b1, dt=2 * 3600)  # February
    b3 = b.add(b2, dt=3 * 3600)
    out.append(b.done([r, b1, b2, b3]))

    # Equal-length branches: the higher summed score wins even if the other is earlier/smaller id.
    b = _Builder("tie by score", t)
    r = b.add(None)
    q = b.add(r, score=1, dt=100, cid=f"{b.key}a")  # earlier, smaller id, lower score
    q2 = b.add(q, score=1, dt=400)
    p = b.add(r, score=5, dt=200, cid=f"{b.key}b")
    p2 = b.add(p, score=1, dt=300)
    assert q2 and p2
    out.append(b.done([r, p, p2]))

    # Equal length and score: the earlier branch wins even though its id is larger.
    b = _Builder("tie by time", t)
    r = b.add(None)
    late = b.add(r, dt=500, cid=f"{b.key}a")
    b.add(late, dt=600)
    early = b.add(r, dt=200, cid=f"{b.key}b")
    e2 = b.add(early, dt=700)
    out.append(b.done([r, early, e2]))

    # Equal length, score and time: the smaller id wins.
    b = _Builder("tie by id", t)
    r = b.add(None)
    hi = b.add(r, dt=300, cid=f"{b.key}z")
    b.add(hi, dt=400)
    lo = b.add(r, dt=300, cid=f"{b.key}y")
    lo2 = b.add(lo, dt=400)
    out.append(b.done([r, lo, lo2]))

    # Tie between two whole root chains, decided at the root: earlier root wins.
    b = _Builder("tie between roots", t)
    r1 = b.chain(None, 3, dt=None)
    r0 = b.add(None, dt=1)  # created before r1's root
    r0c = b.chain(r0, 2)
    assert r1
    out.append(b.done([r0, *r0c]))

    # A deleted comment mid-chain ends that chain: the 7-long branch is only 3 long before it.
    b = _Builder("deleted mid-chain", t)
    r = b.add(None)
    a = b.chain(r, 2)
    d = b.add(a[-1], body="[deleted]", author="[deleted]")
    b.chain(d, 3)
    bb = b.chain(r, 4)
    out.append(b.done([r, *bb]))

    # A removed comment ends the chain at that point; what was below it is discarded.
    b = _Builder("removed ends chain", t)
    r = b.add(None)
    a = b.chain(r, 3)
    x = b.add(a[-1], body="[removed]")
    b.chain(x, 2)
    b.chain(r, 1)
    out.append(b.done([r, *a]))

    # A deleted root comment takes its whole subtree with it.
    b = _Builder("deleted root", t)
    d = b.add(None, body="[deleted]")
    b.chain(d, 5)
    other = b.chain(None, 2)
    out.append(b.done(other))

    # Orphans: no submission in any file; kept (flagged) by default.
    b = _Builder("orphan", t, orphan=True)
    r = b.add(None)
    a = b.chain(r, 2)
    b.add(r)
    out.append(b.done([r, *a]))

    # A chain deeper than Python's recursion limit, with a side branch far down.
    b = _Builder("deep", t)
    deep = b.chain(None, 1500, dt=5)
    b.chain(deep[699], 50, dt=5)
    out.append(b.done(deep))

    # A comment whose parent is in no file cannot be reached from the top.
    b = _Builder("parent missing", t)
    r = b.add(None)
    rc = b.chain(r, 1)
    lost = b.add("s99999c9999")
    b.chain(lost, 4)
    out.append(b.done([r, *rc]))

    # Each Roller filter: the long branch holds one offending comment second from the top.
    offenders = {
        "bot": {"author": "RemindMeBot"},
        "url": {"body": "See https://example.com/page for details."},
        "long_no_space": {"body": "x" * 2049},
        "short": {"body": "ok"},
        "non_ascii_start": {"body": "\u00bfQu\u00e9 pasa, amigo?"},
    }
    for fname, kw in offenders.items():
        b = _Builder(f"filter {fname}", t)
        r = b.add(None)
        a1 = b.add(r)
        bad = b.add(a1, **kw)
        rest = b.chain(bad, 2)
        clean = b.chain(r, 3)
        out.append(b.done([r, a1, bad, *rest], [r, *clean]))

    # A submission without comments (dropped with the default min_comments=1).
    b = _Builder("no comments", t)
    out.append(b.done([], []))
    return out


def write_dump(threads: list[Thread], out_dir: Path) -> list[Path]:
    """RS_/RC_ monthly files holding `threads`, each file in created_utc order."""
    files: dict[str, list[tuple]] = {}
    for th in threads:
        if th.submission is not None:
            s = th.submission
            files.setdefault(f"RS_{month_of(s['created_utc'])}.zst", []).append(
                (s["created_utc"], s["id"], s)
            )
        for c in th.comments:
            files.setdefault(f"RC_{month_of(c['created_utc'])}.zst", []).append(
                (c["created_utc"], c["id"], c)
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in sorted(files.items()):
        rows.sort(key=lambda x: (x[0], x[1]))
        data = "".join(json.dumps(r[2]) + "\n" for r in rows).encode("utf-8")
        path = out_dir / name
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
        paths.append(path)
    return paths


def brute_force_chain(comments: list[dict]) -> list[str]:
    """The stage's rule computed the slow, obvious way: list every root-to-leaf path (a path
    stops before a `[deleted]`/`[removed]` comment), then take the longest, then the highest
    summed score, then the lexicographically smallest sequence of (created_utc, id)."""
    by_id = {c["id"]: c for c in comments}
    kids: dict[str, list[str]] = {}
    roots = []
    for c in comments:
        if c["parent_id"].startswith("t1_"):
            kids.setdefault(c["parent_id"][3:], []).append(c["id"])
        else:
            roots.append(c["id"])
    paths = []
    stack = [[r] for r in roots if by_id[r]["body"] not in ("[deleted]", "[removed]")]
    while stack:
        p = stack.pop()
        ok = [k for k in kids.get(p[-1], ()) if by_id[k]["body"] not in ("[deleted]", "[removed]")]
        if not ok:
            paths.append(p)
        stack.extend(p + [k] for k in ok)
    if not paths:
        return []

    def key(p):
        return (
            -len(p),
            -sum(by_id[i]["score"] for i in p),
            [(by_id[i]["created_utc"], i) for i in p],
        )

    return min(paths, key=key)


def _random_tree(rng: random.Random, key: str, n: int, t0: int, deleted_p: float) -> list[dict]:
    """n comments; each replies to the submission (p=0.25) or to a uniformly chosen earlier
    comment, giving the bushy, shallow shapes of real threads."""
    out = []
    for i in range(n):
        cid = f"{key}_{i:x}"
        if i == 0 or rng.random() < 0.25:
            parent = f"t3_{key}"
        else:
            parent = "t1_" + out[rng.randrange(i)]["id"]
        body = "[deleted]" if rng.random() < deleted_p else _sentence(rng)
        out.append(
            {
                "id": cid,
                "parent_id": parent,
                "link_id": f"t3_{key}",
                "body": body,
                "author": f"user{rng.randrange(100000)}",
                "created_utc": t0 + 30 * i + rng.randrange(30),
                "score": rng.randrange(-3, 12),
                "subreddit": "AskReddit",
            }
        )
    return out


_WORDS = (
    "the of and to in is that it was for on are with as this be at have from or one had by "
    "word but not what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like"
).split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 60))).capitalize() + "."


def write_random_dump(
    out_dir: Path,
    n_comments: int,
    seed: int = 0,
    months: int = 2,
    mean_comments: int = 16,
    orphan_p: float = 0.01,
    deleted_p: float = 0.03,
    extra_fields: bool = True,
    expected: bool = False,
) -> dict:
    """Stream a random dump of about `n_comments` comments into monthly RS_/RC_ files (about 10%
    of each thread's comments land in the next month's file). Returns counts, and with
    `expected=True` each thread's brute-force answer {key: chain ids} (small dumps only)."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, object] = {}

    def writer(name: str):
        w = writers.get(name)
        if w is None:
            # One compressor per file: writers sharing a ZstdCompressor corrupt each other.
            cctx = zstandard.ZstdCompressor(level=3)
            w = writers[name] = cctx.stream_writer(open(out_dir / name, "wb"), closefd=True)
        return w

    ec, es = (_EXTRA_COMMENT, _EXTRA_SUBMISSION) if extra_fields else ({}, {})
    answers: dict[str, list[str]] = {}
    n = threads = orphans = 0
    span = months * 28 * DAY
    while n < n_comments:
        key = f"r{threads:07x}"
        k = min(max(1, int(rng.expovariate(1 / mean_comments))), 400, n_comments - n)
        t0 = BASE + (span * n) // n_comments
        month = month_of(t0)
        comments = _random_tree(rng, key, k, t0, deleted_p)
        if rng.random() < orphan_p:
            orphans += 1
        else:
            sub = {
                "id": key,
                "title": _sentence(rng)[:80],
                "selftext": _sentence(rng) if rng.random() < 0.5 else "",
                "author": f"user{rng.randrange(100000)}",
                "created_utc": t0,
                "score": rng.randrange(100),
                "subreddit": "AskReddit",
                **es,
            }
            writer(f"RS_{month}.zst").write((json.dumps(sub) + "\n").encode())
        late = month_of(t0 + 31 * DAY)
        w_now, w_late = writer(f"RC_{month}.zst"), writer(f"RC_{late}.zst")
        for c in comments:
            w = w_late if rng.random() < 0.1 else w_now
            w.write((json.dumps({**c, **ec}) + "\n").encode())
        if expected:
            answers[key] = brute_force_chain(comments)
        n += k
        threads += 1
    for w in writers.values():
        w.close()
    return {"comments": n, "threads": threads, "orphans": orphans, "expected": answers}
