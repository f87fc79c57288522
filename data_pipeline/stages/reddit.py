"""Pushshift Reddit dumps -> one document per thread: the submission, then its longest comment
chain.

OPT used the Reddit subset of Roller et al. (2021) reduced, per thread, to the single longest chain
of comments from the top down (about 66% smaller than the whole threads). Real dumps are far
larger than RAM and a thread's pieces are spread over monthly files (a submission in `RS_2019-01`,
its comments in `RC_2019-01` and `RC_2019-02`), so the stage is a map and a reduce over bucket
files, each split into tasks (data_pipeline.runtime.executors: local processes, Slurm job arrays
or Ray):

1. map: task r streams its contiguous share of the (sorted) input files and appends each
   submission and comment (only the fields needed) to its own bucket file of `num_buckets`,
   chosen by a stable hash (crc32) of the thread id (`link_id`), so all of a thread's pieces
   land in the same bucket number whatever file, or task, they came from;
2. reduce: task r takes a contiguous range of bucket numbers, reads each bucket from every map
   task in map order (so records meet in input order, as in one process), rebuilds the threads
   and writes each thread's longest chain to part r (threads in bucket order, then by id);
3. report: the stage report summing every task, the rejects, and for a file output the parts
   joined into it.

The output is the same bytes for any tasks, workers or executor. Peak memory of a reduce task
follows the largest bucket, of a map task its write buffer; neither depends on the dump size.
Each task writes atomically and datatrove records its completion, so a re-run redoes only the
tasks that did not finish. The work directory (`<output>` beside it, `.<name>.work`) is removed
after success unless `keep_work=true`.

Choices OPT's description leaves open (see docs/data-reddit-clean.md):
- submission vs comment: an `RS_*` file holds submissions, an `RC_*` file comments; in any other
  file a line with `parent_id` is a comment and one with `title` a submission.
- `[deleted]`/`[removed]` bodies, and comments a filter rejects, end a chain at that point: the
  comment and everything below it leave the tree (a chain must read as one conversation).
- tie-break among equal-length chains: higher summed score, then the chain whose first differing
  comment is earlier (created_utc, then smaller id). This is decided locally at each branch
  point, which is exactly the global rule because equal-length chains share their prefix.
- orphans (comments whose submission is in no input): `orphans=keep` (default) still emits the
  longest chain, without a title, with `meta.orphan = true`; `orphans=drop` counts and drops them.
- duplicate ids (a comment present in two dumps): the first one read (inputs sorted) wins.
"""

from __future__ import annotations

import json
import marshal
import re
import struct
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from data_pipeline.config_limits import AT_LEAST_1, NON_NEGATIVE, OneOf, check_limits
from data_pipeline.documents import (
    AtomicWriter,
    InputLimits,
    Rejects,
    iter_json_lines,
)
from data_pipeline.files import publish_dir
from data_pipeline.runtime import executors, scaleout
from data_pipeline.runtime.cli import rejects_path, stage_main, to_container, write_report
from data_pipeline.runtime.plan import BYTES_PER_TASK, StagePlan
from data_pipeline.stages.reddit_threads import (
    BOT,
    DELETED,
    GONE,
    LONG_NO_SPACE,
    NON_ASCII_START,
    OK,
    REMOVED,
    SHORT,
    URL,
    resolve_bucket,
)

# Bucket files are a sequence of frames: 8-byte little-endian length, then a marshalled list of
# records (marshal.load on a file object reads in tiny pieces, a call per piece; a bucket is read
# whole and its frames are unmarshalled from memory).
_FRAME = struct.Struct("<Q")


@dataclass
class RedditFilters:
    """The comment filters of Roller et al. (2021), whose Reddit subset OPT trained on. Off unless
    `enabled`; each one can then be switched off alone (a length of 0 disables it)."""

    enabled: bool = False
    bots: bool = True
    bot_authors: list[str] = field(default_factory=lambda: ["AutoModerator"])
    bot_pattern: str = r"(?i)bot$"
    urls: bool = True
    url_pattern: str = r"(?i)https?://|www\.[a-z0-9-]+\.[a-z]"
    max_chars_without_space: int = 2048
    min_chars: int = 5
    non_ascii_start: bool = True
    max_depth: int = 7

    def __post_init__(self) -> None:
        check_limits(self, "filters", FILTER_LIMITS)


@dataclass
class RedditConfig(scaleout.ScaleOut):
    """Keys of `python -m data_pipeline.reddit` (docs/data-reddit-clean.md); the scale-out
    keys (tasks, workers, executor, slurm) are data_pipeline.runtime.scaleout's."""

    input: Any = MISSING
    output: str = MISSING
    num_buckets: int = 1024
    flush_records: int = 50_000
    orphans: str = "keep"
    min_comments: int = 1
    separator: str = "\n\n"
    # The parent of this stage's private opt-train-reddit.work/ (data_pipeline/ownership.py); unset:
    # .<output name>.work beside the output. Nothing else in it is ever removed.
    work_dir: str | None = None
    keep_work: bool = False
    filters: RedditFilters = field(default_factory=RedditFilters)

    def __post_init__(self) -> None:
        _validate(self)


# Allowed values (data_pipeline.config_limits); a length of 0 switches its filter off.
FILTER_LIMITS = {
    "max_chars_without_space": NON_NEGATIVE,
    "min_chars": NON_NEGATIVE,
    "max_depth": NON_NEGATIVE,
}
REDDIT_LIMITS = {
    "num_buckets": AT_LEAST_1,
    "flush_records": AT_LEAST_1,
    "orphans": OneOf(("keep", "drop")),
    "min_comments": NON_NEGATIVE,
}


def _thread_key(link_id: str) -> str:
    return link_id[3:] if link_id.startswith("t3_") else link_id


def _as_int(v: Any) -> int:
    """Pushshift stores created_utc/score as ints, floats or strings depending on the year."""
    try:
        return int(float(v))
    except (TypeError, ValueError, OverflowError):  # None, "abc", NaN, inf
        return 0


def _file_kind(path: Path) -> str | None:
    name = path.name
    if name.startswith("RS_"):
        return "s"
    if name.startswith("RC_"):
        return "c"
    return None


class _CommentFilter:
    """Status of a comment body before any tree is built (everything except depth)."""

    def __init__(self, f: RedditFilters):
        self.on = f.enabled
        self.bot_authors = set(f.bot_authors) if f.enabled and f.bots else set()
        self.bot_re = re.compile(f.bot_pattern) if f.enabled and f.bots and f.bot_pattern else None
        self.url_re = re.compile(f.url_pattern) if f.enabled and f.urls else None
        n = f.max_chars_without_space if f.enabled else 0
        self.long_n = n
        self.long_re = re.compile(r"\S{" + str(n + 1) + "}") if n > 0 else None
        self.min_chars = f.min_chars if f.enabled else 0
        self.non_ascii = f.enabled and f.non_ascii_start

    def status(self, body: str, author: Any) -> int:
        if body in GONE:
            return DELETED if body == "[deleted]" else REMOVED
        if not self.on:
            return OK
        if isinstance(author, str) and (
            author in self.bot_authors or (self.bot_re is not None and self.bot_re.search(author))
        ):
            return BOT
        if self.url_re is not None and self.url_re.search(body):
            return URL
        if self.long_re is not None and len(body) > self.long_n and self.long_re.search(body):
            return LONG_NO_SPACE
        stripped = body.strip()
        if len(stripped) < self.min_chars:
            return SHORT
        if self.non_ascii and stripped and ord(stripped[0]) > 127:
            return NON_ASCII_START
        return OK


def _comment_record(obj: dict, flt: _CommentFilter, stats: Counter) -> tuple:
    """A comment's bucket record: (1, thread key, id, parent_id, created_utc, score, body or
    None when filtered, status, subreddit). KeyError/TypeError: a malformed line (a reject)."""
    cid, parent, link, body = obj["id"], obj["parent_id"], obj["link_id"], obj["body"]
    if not (type(cid) is str and type(parent) is str and type(link) is str and type(body) is str):
        raise TypeError("id, parent_id, link_id and body must be strings")
    status = flt.status(body, obj.get("author"))
    stats["comments"] += 1
    stats["text_bytes_in"] += len(body.encode("utf-8"))
    return (
        1,
        _thread_key(link),
        cid,
        parent,
        _as_int(obj.get("created_utc")),
        _as_int(obj.get("score")),
        body if status == OK else None,
        status,
        obj.get("subreddit") or "",
    )


def _submission_record(obj: dict, stats: Counter) -> tuple:
    """A submission's bucket record: (0, thread key = its id, created_utc, score, subreddit,
    title, selftext). KeyError/TypeError: a malformed line (a reject)."""
    sid = obj["id"]
    title = obj.get("title") or ""
    selftext = obj.get("selftext") or ""
    if not (type(sid) is str and type(title) is str and type(selftext) is str):
        raise TypeError("id, title and selftext must be strings")
    stats["submissions"] += 1
    stats["text_bytes_in"] += len(title.encode("utf-8")) + len(selftext.encode("utf-8"))
    return (
        0,
        sid,
        _as_int(obj.get("created_utc")),
        _as_int(obj.get("score")),
        obj.get("subreddit") or "",
        title,
        "" if selftext in GONE else selftext,
    )


class _Buckets:
    """One map task's bucket files: records buffered per bucket (chosen by crc32 of the thread
    key, so a thread's pieces meet whatever file or task they came from) and appended as one
    frame per bucket every `flush_records` records, which bounds the task's memory."""

    def __init__(self, work: Path, n: int, flush_records: int):
        self.bufs: list[list] = [[] for _ in range(n)]
        self.paths = [work / f"bucket-{i:05d}.bin" for i in range(n)]
        self.flush_records = flush_records
        self.pending = 0

    def add(self, rec: tuple) -> None:
        self.bufs[zlib.crc32(rec[1].encode("utf-8")) % len(self.bufs)].append(rec)
        self.pending += 1
        if self.pending >= self.flush_records:
            self.flush()

    def flush(self) -> None:
        for i, buf in enumerate(self.bufs):
            if buf:
                data = marshal.dumps(buf)
                with open(self.paths[i], "ab") as f:
                    f.write(_FRAME.pack(len(data)) + data)
                buf.clear()
        self.pending = 0


def _partition(
    cfg: RedditConfig, files: list[Path], work: Path, rejects: Rejects, progress
) -> dict:
    """Pass 1: stream the dumps into bucket files of marshalled record lists. marshal is the
    fastest stdlib serialiser for tuples of str/int and the files never leave this process's
    Python version (they are scratch, deleted after success)."""
    buckets = _Buckets(work, cfg.num_buckets, cfg.flush_records)
    flt = _CommentFilter(cfg.filters)
    stats: Counter = Counter()
    for path in files:
        stats["input_bytes"] += path.stat().st_size
        kind = _file_kind(path)
        for lineno, obj in iter_json_lines(path, rejects, progress=progress):
            k = kind or ("c" if "parent_id" in obj else "s" if "title" in obj else None)
            try:
                if k == "c":
                    rec = _comment_record(obj, flt, stats)
                elif k == "s":
                    rec = _submission_record(obj, stats)
                else:
                    raise LookupError("neither a submission (title) nor a comment (parent_id)")
            except KeyError as e:
                reason = f"missing field {e.args[0]!r}"
            except (TypeError, LookupError) as e:
                reason = str(e)
            else:
                buckets.add(rec)
                continue
            rejects.add(path, lineno, reason, json.dumps(obj, ensure_ascii=False)[:10000])
    buckets.flush()
    return dict(stats)


def _load_bucket(path: Path) -> list:
    recs: list = []
    if not path.exists():
        return recs
    data = memoryview(path.read_bytes())
    pos, n = 0, len(data)
    while pos < n:
        (size,) = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        recs.extend(marshal.loads(data[pos : pos + size]))
        pos += size
    return recs


def _validate(cfg: RedditConfig) -> None:
    check_limits(cfg, "", REDDIT_LIMITS)
    scaleout.validate(cfg)


class _Plan(StagePlan):
    """The run's input files and their map shares (StagePlan), and the reduce tasks' shares of
    the buckets."""

    stage = "reddit"

    def __init__(self, cfg: RedditConfig):
        super().__init__(cfg)
        sizes = self.share_files()
        self.reduce_tasks = scaleout.auto_tasks(
            cfg, sum(sizes), BYTES_PER_TASK, cfg.num_buckets, "buckets"
        )
        self.bucket_shares = scaleout.even_shares(cfg.num_buckets, self.reduce_tasks)

    def fingerprint(self) -> dict:
        """What the work files depend on: a re-run reuses finished tasks only if all is equal."""
        cfg = self.cfg
        return {
            "files": self.files_fingerprint(),
            "output": str(self.out.resolve()),
            "tasks": [self.tasks, self.reduce_tasks],
            "num_buckets": cfg.num_buckets,
            "filters": to_container(cfg.filters),
            "orphans": cfg.orphans,
            "min_comments": cfg.min_comments,
            "separator": cfg.separator,
            # marshal's format may change between Python versions.
            "python": sys.version,
            "limits": InputLimits.of(cfg).fingerprint(),
        }


class RedditMap(scaleout.TaskStep):
    """Task r parses its share of the input files into its own bucket files."""

    name = "map"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        lo, hi = plan.shares[rank]
        final = self.work / "map" / f"task-{rank:05d}"
        tmp = scaleout.fresh_task_dir(final)
        rejects = Rejects(tmp / "rejects.jsonl", InputLimits.of(self.cfg))
        files = plan.files[lo:hi]
        total = sum(f.stat().st_size for f in files)
        try:
            with scaleout.progress(self.cfg, f"reddit map task {rank}/{world_size}", total) as bar:
                stats = _partition(self.cfg, files, tmp, rejects, bar)
        finally:
            rejects.close()
        publish_dir(tmp, final)
        return {"files": hi - lo, **stats, "rejects": rejects.report()}


class RedditReduce(scaleout.TaskStep):
    """Task r takes its share of the buckets (from every map task, in map order, so records
    meet in input order as in one process), rebuilds the threads and writes part r."""

    name = "reduce"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        lo, hi = plan.bucket_shares[rank]
        maps = [self.work / "map" / f"task-{m:05d}" for m in range(plan.tasks)]
        part = plan.part(rank)
        scaleout.remove_stale(part.parent, f".{part.name}.tmp-*")  # of a killed attempt
        stats: Counter = Counter()
        largest = 0
        desc = f"reddit reduce task {rank}/{world_size}"
        with AtomicWriter(part) as out, scaleout.progress(self.cfg, desc, hi - lo, "bucket") as bar:
            for i in range(lo, hi):
                recs = []
                for m in maps:
                    recs.extend(_load_bucket(m / f"bucket-{i:05d}.bin"))
                largest = max(largest, len(recs))
                resolve_bucket(recs, self.cfg, out, stats)
                del recs
                bar.update(1)
        return {**stats, "largest_bucket_records": largest}


class RedditReport(scaleout.TaskStep):
    """One task: the stage report (every task's statistics summed), the rejects file (every
    map task's, in input order) and, for a file output, the parts joined into it."""

    name = "report"

    def task(self, rank: int, world_size: int) -> dict:
        plan = self.plan
        maps = scaleout.task_stats(self.work, "map", plan.tasks)
        reduces = scaleout.task_stats(self.work, "reduce", plan.reduce_tasks)
        rejects = scaleout.gather_rejects(
            [self.work / "map" / f"task-{m:05d}" / "rejects.jsonl" for m in range(plan.tasks)],
            [m["rejects"] for m in maps],
            rejects_path(plan.out),
        )
        parts = [plan.part(r) for r in range(plan.reduce_tasks)]
        scaleout.finish_parts(parts, plan.out, plan.to_file)
        report = _report(plan, maps, reduces, rejects)
        write_report(plan.out, report)
        return {"threads_out": report["threads_out"]}


def _sum(stats: list[dict]) -> Counter:
    total: Counter = Counter()
    for st in stats:
        total.update({k: v for k, v in st.items() if isinstance(v, int) and k != "rejects"})
    return total


def _report(plan: _Plan, maps: list[dict], reduces: list[dict], rejects: Rejects) -> dict:
    cfg = plan.cfg
    pass1, stats = _sum(maps), _sum(reduces)
    steps = {"map": maps, "reduce": reduces}
    text_in = pass1.get("text_bytes_in", 0)
    text_out = stats.get("text_bytes_out", 0)
    fates = {k.split(":", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("comments:")}
    return {
        "stage": "reddit",
        "output": str(plan.out),
        "files": len(plan.files),
        "tasks": {"map": plan.tasks, "reduce": plan.reduce_tasks},
        "input_bytes": pass1.get("input_bytes", 0),
        "submissions_in": pass1.get("submissions", 0),
        "comments_in": pass1.get("comments", 0),
        "threads_out": stats.get("threads_out", 0),
        "comments_out": stats.get("comments_out", 0),
        "orphan_threads_out": stats.get("orphan_threads_out", 0),
        "orphan_threads_dropped": stats.get("orphan_threads_dropped", 0),
        "threads_dropped_short_chain": stats.get("threads_dropped_short_chain", 0),
        "threads_dropped_empty": stats.get("threads_dropped_empty", 0),
        "duplicate_comments": stats.get("duplicate_comments", 0),
        "duplicate_submissions": stats.get("duplicate_submissions", 0),
        "comment_fates": fates,
        "filters": {k: v for k, v in fates.items() if k.startswith("filter:")},
        "text_bytes_in": text_in,
        "text_bytes_out": text_out,
        "size_reduction_bytes": text_in - text_out,
        "size_reduction_percent": round(100.0 * (text_in - text_out) / text_in, 2)
        if text_in
        else 0.0,
        "num_buckets": cfg.num_buckets,
        "largest_bucket_records": max((r["largest_bucket_records"] for r in reduces), default=0),
        # Summed over each step's tasks: CPU seconds do not depend on what else the machine
        # runs; per-core rates for sizing come from them (docs/data-pipeline.md).
        "timings_s": {s: round(sum(t["seconds"] for t in st), 3) for s, st in steps.items()},
        "cpu_s": {s: round(sum(t["cpu_s"] for t in st), 3) for s, st in steps.items()},
        "max_rss_mb": {s: max(t["max_rss_mb"] for t in st) for s, st in steps.items()},
        "config": to_container(cfg),
        "rejects": rejects.report(),
    }


def run(cfg: RedditConfig) -> dict:
    """map -> reduce -> report on the configured executor; returns the stage report (with
    slurm.wait=false, the submitted job ids: the report is written when the jobs end)."""
    _validate(cfg)
    t0 = time.perf_counter()
    plan = _Plan(cfg)
    with scaleout.owned(plan, "reddit"):
        scaleout.prepare(plan, [("map", plan.fingerprint()), ("reduce", {}), ("report", {})])
        steps = [
            (RedditMap(plan), plan.tasks),
            (RedditReduce(plan), plan.reduce_tasks),
            (RedditReport(plan), 1),
        ]
        jobs = executors.run_steps(steps, cfg, plan.work)
        return scaleout.finish("reddit", plan, jobs, t0, "comments_in", "comments_per_s")


def main() -> None:
    # Through the module's import name, not __main__: the executors pickle the steps, and a
    # class of __main__ would be pickled by value, without the module's other names.
    from data_pipeline.stages import reddit

    stage_main("reddit", reddit.RedditConfig, reddit.run)


if __name__ == "__main__":
    main()
