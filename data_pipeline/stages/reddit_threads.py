"""The Reddit stage's thread rule: a thread's comments -> its longest chain, as one document.

Bucket records (written by the map step, data_pipeline/stages/reddit.py) carry each comment's
status code; a comment that is not OK ends its chain there. The tie-break among equal-length
chains is decided locally at each branch point, which is exactly the global rule because
equal-length chains share their prefix.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from data_pipeline.documents import AtomicWriter

# Per-comment status codes stored in the buckets (a small int keeps the records compact).
OK, DELETED, REMOVED, BOT, URL, LONG_NO_SPACE, SHORT, NON_ASCII_START = range(8)
STATUS_NAMES = {
    DELETED: "deleted",
    REMOVED: "removed",
    BOT: "filter:bot",
    URL: "filter:url",
    LONG_NO_SPACE: "filter:long_no_space",
    SHORT: "filter:short",
    NON_ASCII_START: "filter:non_ascii_start",
}
GONE = ("[deleted]", "[removed]")


def longest_chain(comments: dict[str, tuple], max_depth: int, fates: Counter) -> list[tuple]:
    """The longest root->leaf chain of one thread's comments (id -> bucket record), with the
    documented tie-break; counts every comment's fate into `fates`. Iterative, because real
    threads reach depths that would overflow Python's recursion limit."""
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for cid, r in comments.items():
        parent = r[3]
        if parent.startswith("t1_"):
            children.setdefault(parent[3:], []).append(cid)
        else:
            roots.append(cid)
    # Pre-order walk: classify each comment; `valid` keeps chain candidates parent-before-child.
    valid: list[str] = []
    seen = 0
    stack = [(cid, 1, False) for cid in roots]
    while stack:
        cid, depth, cut = stack.pop()
        seen += 1
        r = comments[cid]
        if cut:
            fates["below_cut"] += 1
        elif r[7] != OK:
            fates[STATUS_NAMES[r[7]]] += 1
            cut = True
        elif max_depth and depth > max_depth:
            # Not a cut: everything below is deeper still, so it is counted as depth too.
            fates["filter:depth"] += 1
        else:
            valid.append(cid)
        for c in children.get(cid, ()):
            stack.append((c, depth + 1, cut))
    fates["parent_missing"] += len(comments) - seen
    # Bottom-up: best[c] = (length, summed score, next comment id or None).
    best: dict[str, tuple] = {}
    for cid in reversed(valid):
        choice = _pick([c for c in children.get(cid, ()) if c in best], best, comments)
        r = comments[cid]
        if choice is None:
            best[cid] = (1, r[5], None)
        else:
            b = best[choice]
            best[cid] = (b[0] + 1, b[1] + r[5], choice)
    cur = _pick([c for c in roots if c in best], best, comments)
    chain = []
    while cur is not None:
        chain.append(comments[cur])
        cur = best[cur][2]
    fates["in_chain"] += len(chain)
    fates["other_branch"] += len(valid) - len(chain)
    return chain


def _pick(cands: list[str], best: dict, comments: dict) -> str | None:
    """Longest, then highest summed score, then earliest created_utc, then smallest id."""
    top = None
    for c in cands:
        if top is None:
            top = c
            continue
        b, t = best[c], best[top]
        if (b[0], b[1]) != (t[0], t[1]):
            if (b[0], b[1]) > (t[0], t[1]):
                top = c
        elif (comments[c][4], c) < (comments[top][4], top):
            top = c
    return top


def resolve_bucket(recs: list, cfg: Any, out: AtomicWriter, stats: Counter) -> None:
    """Rebuild the threads of one bucket's records (in input order) and write each thread's
    document, threads sorted by id; `cfg` is the stage's RedditConfig (filters.max_depth,
    orphans, min_comments, separator)."""
    subs: dict[str, tuple] = {}
    threads: dict[str, dict[str, tuple]] = {}
    for r in recs:
        if r[0] == 1:
            t = threads.get(r[1])
            if t is None:
                t = threads[r[1]] = {}
            if r[2] in t:
                stats["duplicate_comments"] += 1
            else:
                t[r[2]] = r
        elif r[1] in subs:
            stats["duplicate_submissions"] += 1
        else:
            subs[r[1]] = r
    max_depth = cfg.filters.max_depth if cfg.filters.enabled else 0
    fates: Counter = Counter()
    sep = cfg.separator
    for key in sorted(subs.keys() | threads.keys()):
        sub = subs.get(key)
        comments = threads.get(key, {})
        if sub is None and cfg.orphans == "drop":
            stats["orphan_threads_dropped"] += 1
            fates["orphan_dropped"] += len(comments)
            continue
        chain = longest_chain(comments, max_depth, fates) if comments else []
        if len(chain) < cfg.min_comments:
            stats["threads_dropped_short_chain"] += 1
            continue
        parts = [] if sub is None else [p for p in (sub[5], sub[6]) if p]
        parts.extend(r[6] for r in chain)
        text = sep.join(parts)
        if not text.strip():
            stats["threads_dropped_empty"] += 1
            continue
        if sub is None:
            stats["orphan_threads_out"] += 1
        meta = {
            "source": "reddit",
            "subreddit": sub[4] if sub is not None else chain[0][8],
            "created_utc": sub[2] if sub is not None else chain[0][4],
            "orphan": sub is None,
            "thread_comments": len(comments),
            "comment_ids": [r[2] for r in chain],
        }
        out.write(json.dumps({"text": text, "id": "t3_" + key, "meta": meta}, ensure_ascii=False))
        out.write("\n")
        stats["threads_out"] += 1
        stats["comments_out"] += len(chain)
        stats["text_bytes_out"] += len(text.encode("utf-8"))
    stats.update({"comments:" + k: v for k, v in fates.items()})
