"""The reddit stage: one document per thread holding exactly its longest comment chain, out of
core, with bad input counted and killed runs completing on re-run.

Known answers come from tests/data_pipeline/pushshift_gen.py: hand-built scenarios whose answer is
written down by construction, and random trees checked against a brute-force path enumerator."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from data_pipeline.documents import expand_inputs, iter_lines
from data_pipeline.ownership import claim_work
from data_pipeline.runtime.cli import EXIT_FAILED, EXIT_OK, EXIT_REJECTS, rejects_path
from data_pipeline.stages.reddit import RedditConfig, RedditFilters, run
from tests.data_pipeline.pushshift_gen import (
    brute_force_chain,
    month_of,
    scenarios,
    write_dump,
    write_random_dump,
)

from .conftest import assert_no_stage_processes

REPO = Path(__file__).resolve().parents[2]


def read_out(path: Path) -> dict[str, dict]:
    return {d["id"]: d for d in map(json.loads, path.read_text().splitlines())}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.reddit", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def scenario_dump(tmp_path_factory) -> tuple[list, Path]:
    threads = scenarios()
    d = tmp_path_factory.mktemp("scenarios")
    write_dump(threads, d / "in")
    return threads, d / "in"


@pytest.fixture(scope="module")
def scenario_run(scenario_dump, tmp_path_factory) -> tuple[dict, dict]:
    threads, inp = scenario_dump
    out = tmp_path_factory.mktemp("scen_out") / "reddit.jsonl"
    report = run(RedditConfig(input=str(inp), output=str(out), num_buckets=5))
    return report, read_out(out)


def test_dump_spans_several_monthly_files(scenario_dump):
    _, inp = scenario_dump
    assert sorted(p.name for p in inp.iterdir()) == [
        "RC_2020-01.zst",
        "RC_2020-02.zst",
        "RS_2020-01.zst",
    ]


@pytest.mark.parametrize("name", [t.name for t in scenarios() if t.expected])
def test_each_thread_is_exactly_its_longest_chain_in_order(scenario_dump, scenario_run, name):
    threads, _ = scenario_dump
    th = next(t for t in threads if t.name == name)
    _, docs = scenario_run
    doc = docs["t3_" + th.key]
    assert doc["meta"]["comment_ids"] == th.expected
    assert doc["text"] == th.text(th.expected)
    assert doc["meta"]["orphan"] is (th.submission is None)
    assert doc["meta"]["thread_comments"] == len(th.comments)


def test_one_document_per_thread_and_thread_without_comments_dropped(scenario_dump, scenario_run):
    threads, _ = scenario_dump
    report, docs = scenario_run
    assert set(docs) == {"t3_" + t.key for t in threads if t.expected}
    assert report["threads_out"] == len(docs) == len(threads) - 1
    assert report["threads_dropped_short_chain"] == 1
    assert report["orphan_threads_out"] == 1


def test_report_counts_every_comment_fate_and_size_reduction(scenario_dump, scenario_run):
    threads, _ = scenario_dump
    report, _ = scenario_run
    n = sum(len(t.comments) for t in threads)
    assert report["comments_in"] == n
    assert sum(report["comment_fates"].values()) == n
    assert report["comments_out"] == report["comment_fates"]["in_chain"]
    assert report["comments_out"] == sum(len(t.expected) for t in threads)
    # deleted mid-chain, deleted root; removed; 3 + 2 + 5 below them; parent missing: 1 + 4.
    assert report["comment_fates"]["deleted"] == 2
    assert report["comment_fates"]["removed"] == 1
    assert report["comment_fates"]["below_cut"] == 10
    assert report["comment_fates"]["parent_missing"] == 5
    text_in = sum(len(c["body"].encode()) for t in threads for c in t.comments) + sum(
        len((t.submission["title"] + t.submission["selftext"]).encode())
        for t in threads
        if t.submission
    )
    text_out = sum(len(t.text(t.expected).encode()) for t in threads if t.expected)
    assert report["text_bytes_in"] == text_in
    assert report["text_bytes_out"] == text_out
    assert report["size_reduction_bytes"] == text_in - text_out
    assert report["size_reduction_percent"] == round(100 * (text_in - text_out) / text_in, 2)


def test_roller_filters_pick_the_clean_branch_and_count_each_filter(scenario_dump, tmp_path):
    threads, inp = scenario_dump
    out = tmp_path / "f.jsonl"
    report = run(RedditConfig(input=str(inp), output=str(out), filters=RedditFilters(enabled=True)))
    docs = read_out(out)
    # Every thread with a filtered answer is written, and nothing else: the one without comments
    # (expected_filtered == []) is dropped rather than written empty.
    assert set(docs) == {"t3_" + t.key for t in threads if t.expected_filtered}
    for th in threads:
        got = docs["t3_" + th.key]["meta"]["comment_ids"] if th.expected_filtered else []
        assert got == th.expected_filtered, th.name
    deep = next(t for t in threads if t.name == "deep")
    assert len(docs["t3_" + deep.key]["meta"]["comment_ids"]) == 7
    assert report["filters"] == {
        "filter:bot": 1,
        "filter:url": 1,
        "filter:long_no_space": 1,
        "filter:short": 1,
        "filter:non_ascii_start": 1,
        # the deep thread: 1500 - 7 on the main chain and the 50-long side branch.
        "filter:depth": 1493 + 50,
    }


def test_filters_can_be_switched_off_one_by_one(scenario_dump, tmp_path):
    threads, inp = scenario_dump
    out = tmp_path / "f.jsonl"
    flt = RedditFilters(enabled=True, urls=False, max_depth=0)
    report = run(RedditConfig(input=str(inp), output=str(out), filters=flt))
    docs = read_out(out)
    url = next(t for t in threads if t.name == "filter url")
    deep = next(t for t in threads if t.name == "deep")
    assert docs["t3_" + url.key]["meta"]["comment_ids"] == url.expected
    assert len(docs["t3_" + deep.key]["meta"]["comment_ids"]) == 1500
    assert "filter:url" not in report["filters"] and "filter:depth" not in report["filters"]


def test_orphans_drop_omits_and_counts_them(scenario_dump, tmp_path):
    threads, inp = scenario_dump
    out = tmp_path / "o.jsonl"
    report = run(RedditConfig(input=str(inp), output=str(out), orphans="drop"))
    orphan = next(t for t in threads if t.submission is None)
    assert "t3_" + orphan.key not in read_out(out)
    assert report["orphan_threads_dropped"] == 1
    assert report["comment_fates"]["orphan_dropped"] == len(orphan.comments)


def test_chain_needs_every_monthly_file_of_the_thread(scenario_dump, tmp_path):
    threads, inp = scenario_dump
    out = tmp_path / "jan.jsonl"
    run(
        RedditConfig(
            input=[str(inp / "RS_2020-01.zst"), str(inp / "RC_2020-01.zst")], output=str(out)
        )
    )
    th = next(t for t in threads if t.name == "across months")
    # Without February both January branches have two comments and equal scores: the earlier
    # one (the short branch) wins, exactly what the brute-force oracle says for January alone.
    january = [c for c in th.comments if month_of(c["created_utc"]) == "2020-01"]
    got = read_out(out)["t3_" + th.key]["meta"]["comment_ids"]
    assert got == brute_force_chain(january)
    assert got == [th.expected[0], th.comments[1]["id"]]


def test_random_trees_match_brute_force_oracle_for_any_bucket_count(tmp_path):
    gen = write_random_dump(tmp_path / "in", 6000, seed=3, extra_fields=False, expected=True)
    outs = []
    for nb in (1, 7, 64):
        out = tmp_path / f"o{nb}.jsonl"
        report = run(RedditConfig(input=str(tmp_path / "in"), output=str(out), num_buckets=nb))
        outs.append(sorted(out.read_text().splitlines()))
        assert report["comments_in"] == gen["comments"]
    docs = read_out(tmp_path / "o7.jsonl")
    want = {"t3_" + k: v for k, v in gen["expected"].items() if v}
    assert {k: d["meta"]["comment_ids"] for k, d in docs.items()} == want
    assert sum(d["meta"]["orphan"] for d in docs.values()) > 0
    assert outs[0] == outs[1] == outs[2]


def test_plain_jsonl_is_classified_by_fields(scenario_dump, scenario_run, tmp_path):
    threads, _ = scenario_dump
    lines = [json.dumps(t.submission) for t in threads if t.submission]
    lines += [json.dumps(c) for t in threads for c in t.comments]
    lines.append(json.dumps({"id": "x1", "author": "someone"}))  # neither kind
    (tmp_path / "dump.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.jsonl"
    report = run(RedditConfig(input=str(tmp_path / "dump.jsonl"), output=str(out)))
    assert read_out(out) == scenario_run[1]
    assert report["rejects"]["total"] == 1
    rej = json.loads(rejects_path(out).read_text())
    assert rej["line"] == len(lines) and "neither" in rej["reason"]


def test_duplicate_comment_in_two_dumps_keeps_the_first(tmp_path):
    sub = {"id": "s1", "title": "T", "selftext": "", "created_utc": 1, "score": 1}
    c1 = {"id": "c1", "parent_id": "t3_s1", "link_id": "t3_s1", "body": "first copy here"}
    c1b = {**c1, "body": "second copy here"}
    (tmp_path / "RS_2020-01.jsonl").write_text(json.dumps(sub) + "\n")
    (tmp_path / "RC_2020-01.jsonl").write_text(json.dumps(c1) + "\n")
    (tmp_path / "RC_2020-02.jsonl").write_text(json.dumps(c1b) + "\n")
    out = tmp_path / "out" / "o.jsonl"
    report = run(RedditConfig(input=str(tmp_path), output=str(out)))
    assert read_out(out)["t3_s1"]["text"] == "T\n\nfirst copy here"
    assert report["duplicate_comments"] == 1


def _bad_dump(d: Path) -> dict:
    """Good threads plus each kind of bad line at a known file:line."""
    d.mkdir(parents=True)
    sub = {"id": "s1", "title": "Good thread", "selftext": "", "created_utc": 1, "score": 1}
    good = [
        {
            "id": f"c{i}",
            "parent_id": f"t1_c{i - 1}" if i else "t3_s1",
            "link_id": "t3_s1",
            "body": f"good comment {i}",
            "created_utc": i,
            "score": 1,
        }
        for i in range(3)
    ]
    (d / "RS_2020-01.jsonl").write_text(json.dumps(sub) + "\n")
    lines = [
        json.dumps(good[0]).encode(),
        b'{"id": "c9", "parent_id": ',  # line 2: malformed JSON
        json.dumps(good[1]).encode(),
        b'{"id": "c8", "body": "caf\xe9", "parent_id": "t3_s1", "link_id": "t3_s1"}',  # 4: utf-8
        json.dumps({"id": "c7", "link_id": "t3_s1", "body": "no parent"}).encode(),  # 5
        # unusable score/created_utc values count as 0, the comment is kept
        json.dumps({**good[2], "score": float("inf"), "created_utc": "soon"}).encode(),
        json.dumps({"id": "c6", "parent_id": "t3_s1", "link_id": "t3_s1", "body": 5}).encode(),
    ]
    (d / "RC_2020-01.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # A second thread in a truncated .zst file: the lines before the cut are still used.
    sub2 = {"id": "s2", "title": "Truncated thread", "selftext": "", "created_utc": 2}
    (d / "RS_2020-02.jsonl").write_text(json.dumps(sub2) + "\n")
    body = "".join(
        json.dumps(
            {
                "id": f"t{i:05d}",
                "parent_id": f"t1_t{i - 1:05d}" if i else "t3_s2",
                "link_id": "t3_s2",
                "body": f"chain comment {i} " + "filler " * 20,
            }
        )
        + "\n"
        for i in range(4000)
    ).encode()
    data = zstandard.ZstdCompressor(level=1).compress(body)
    (d / "RC_2020-02.zst").write_bytes(data[: len(data) * 2 // 3])
    return {"n_good_plain": 3}


def test_bad_input_counted_with_file_and_line_and_exit_code_3(tmp_path):
    _bad_dump(tmp_path / "in")
    out = tmp_path / "o.jsonl"
    res = cli(f"input={tmp_path / 'in'}", f"output={out}")
    assert res.returncode == EXIT_REJECTS, res.stderr
    rej = [json.loads(x) for x in rejects_path(out).read_text().splitlines()]
    got = {(Path(r["file"]).name, r["line"], r["reason"].split(" (")[0]) for r in rej}
    assert {x for x in got if x[0] == "RC_2020-01.jsonl"} == {
        ("RC_2020-01.jsonl", 2, "invalid json"),
        ("RC_2020-01.jsonl", 4, "invalid utf-8"),
        ("RC_2020-01.jsonl", 5, "missing field 'parent_id'"),
        ("RC_2020-01.jsonl", 7, "id, parent_id, link_id and body must be strings"),
    }
    trunc = [r for r in rej if Path(r["file"]).name == "RC_2020-02.zst"]
    assert len(trunc) == 1 and trunc[0]["reason"].startswith("truncated or corrupt")
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["rejects"]["total"] == 5
    docs = read_out(out)
    assert docs["t3_s1"]["meta"]["comment_ids"] == ["c0", "c1", "c2"]
    # Every complete line before the cut was used, in order, and nothing after it.
    kept = docs["t3_s2"]["meta"]["comment_ids"]
    assert 0 < len(kept) < 4000
    assert kept == [f"t{i:05d}" for i in range(len(kept))]
    assert trunc[0]["line"] == len(kept) + 1


def test_clean_input_exits_0_and_bad_config_exits_1(scenario_dump, tmp_path):
    _, inp = scenario_dump
    res = cli(f"input={inp}", f"output={tmp_path / 'o.jsonl'}")
    assert res.returncode == EXIT_OK, res.stderr
    assert not rejects_path(tmp_path / "o.jsonl").exists()
    res = cli(f"input={inp}", f"output={tmp_path / 'p.jsonl'}", "orphans=sometimes")
    assert res.returncode == EXIT_FAILED
    assert "orphans" in res.stderr and not (tmp_path / "p.jsonl").exists()


def parts_bytes(out: Path) -> bytes:
    """The lines of a directory output as every stage reads it (its files in name order)."""
    return b"".join(line for p in expand_inputs(out) for line in iter_lines(p))


def test_three_tasks_on_two_workers_give_one_tasks_bytes_threads_across_months_right(
    scenario_dump, tmp_path
):
    threads, inp = scenario_dump
    one = tmp_path / "one.jsonl"
    r1 = run(RedditConfig(input=str(inp), output=str(one), num_buckets=5, tasks=1))
    many = tmp_path / "many"
    r3 = run(RedditConfig(input=str(inp), output=str(many), num_buckets=5, tasks=3, workers=2))
    assert r1["tasks"] == {"map": 1, "reduce": 1}
    assert r3["tasks"] == {"map": 3, "reduce": 3}
    assert sorted(p.name for p in many.iterdir()) == [f"part-0000{i}.jsonl.zst" for i in range(3)]
    assert parts_bytes(many) == one.read_bytes()
    # The map shares really split the monthly files of the cross-month thread between tasks.
    files = sorted(p.name for p in inp.iterdir())
    assert len(files) >= 3, files
    th = next(t for t in threads if t.name == "across months")
    got = {d["id"]: d for d in map(json.loads, parts_bytes(many).decode().splitlines())}
    assert got["t3_" + th.key]["meta"]["comment_ids"] == th.expected
    assert got["t3_" + th.key]["text"] == th.text(th.expected)
    for k in ("threads_out", "comments_in", "comments_out", "comment_fates", "rejects"):
        assert r3[k] == r1[k], k


@pytest.mark.slow  # a Ray actor per task: seconds of start-up each
def test_two_tasks_on_ray_give_the_local_runs_bytes(scenario_dump, tmp_path, local_ray):
    """Each task is a Ray actor, a process of its own: two per step show the split (four and
    more are split locally, test_four_tasks_equal_one_task_on_a_random_dump_with_rejects)."""
    _, inp = scenario_dump
    local = tmp_path / "local.jsonl"
    r1 = run(RedditConfig(input=str(inp), output=str(local), num_buckets=5, tasks=1))
    on_ray = tmp_path / "ray"
    r2 = run(
        RedditConfig(input=str(inp), output=str(on_ray), num_buckets=5, tasks=2, executor="ray")
    )
    assert r2["tasks"] == {"map": 2, "reduce": 2}
    assert parts_bytes(on_ray) == local.read_bytes()
    for k in ("threads_out", "comments_in", "comments_out", "comment_fates", "rejects"):
        assert r2[k] == r1[k], k


def test_a_rerun_with_fewer_tasks_replaces_the_whole_output_directory(scenario_dump, tmp_path):
    _, inp = scenario_dump
    out = tmp_path / "out"
    run(RedditConfig(input=str(inp), output=str(out), num_buckets=5, tasks=3))
    first = parts_bytes(out)
    run(RedditConfig(input=str(inp), output=str(out), num_buckets=5, tasks=2))
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.jsonl.zst", "part-00001.jsonl.zst"]
    assert parts_bytes(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.report.json"]


@pytest.mark.slow
def test_four_tasks_equal_one_task_on_a_random_dump_with_rejects(medium_dump, tmp_path):
    inp, ref = medium_dump
    out = tmp_path / "four"
    r = run(
        RedditConfig(
            input=str(inp), output=str(out), num_buckets=64, flush_records=2000, tasks=4, workers=2
        )
    )
    assert r["tasks"] == {"map": 4, "reduce": 4}
    assert parts_bytes(out) == ref
    assert r["rejects"]["total"] == 2  # both bad lines of RC_2020-03.jsonl, from one task
    bad = [json.loads(x) for x in rejects_path(out).read_text().splitlines()]
    assert [(Path(b["file"]).name, b["line"]) for b in bad] == [
        ("RC_2020-03.jsonl", n) for n in (1, 2)
    ]


@pytest.fixture(scope="module")
def medium_dump(tmp_path_factory) -> tuple[Path, bytes]:
    """~60k comments in several monthly files and the output of an uninterrupted run."""
    d = tmp_path_factory.mktemp("medium")
    write_random_dump(d / "in", 60_000, seed=11)
    (d / "in" / "RC_2020-03.jsonl").write_text('not json\n{"id": "c1", "body": "no parent"}\n')
    out = d / "ref.jsonl"
    run(
        RedditConfig(
            input=str(d / "in"), output=str(out), num_buckets=64, flush_records=2000, tasks=1
        )
    )
    return d / "in", out.read_bytes()


def _kill_when(args: list[str], ready, timeout: float = 60) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.reddit", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its group holds every process it starts
    )
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    assert_no_stage_processes(proc.pid)  # none outlives the driver
    return rc


@pytest.mark.slow
@pytest.mark.parametrize("step", ["map", "reduce"])
def test_killed_task_is_rerun_alone_and_output_is_unchanged(medium_dump, tmp_path, step):
    """tasks=3, workers=1 (tasks one after another in one process): SIGKILL while task 1 of
    `step` is writing; the re-run redoes only the tasks without a completion marker."""
    inp, ref = medium_dump
    out = tmp_path / "o.jsonl"
    work = tmp_path / ".o.jsonl.work"
    args = [
        f"input={inp}",
        f"output={out}",
        "num_buckets=64",
        "flush_records=500",
        "tasks=3",
        "workers=1",
    ]
    if step == "map":
        ready = lambda: any((work / "map").glob(".task-00001.tmp-*/bucket-*"))  # noqa: E731
    else:
        ready = lambda: any((work / "parts").glob(".part-00001.jsonl.zst.tmp-*"))  # noqa: E731
    assert _kill_when(args, ready) == -signal.SIGKILL  # killed, not finished
    assert not out.exists()  # a killed stage leaves nothing that looks complete
    done = work / "executor" / step / "completions"
    assert sorted(p.name for p in done.iterdir()) == ["00000"]
    first = work / "map" / "task-00000"
    before = first.stat().st_ino
    res = cli(*args, "keep_work=true")
    assert res.returncode == EXIT_REJECTS, res.stderr  # finished; the dump has 2 bad lines
    assert json.loads(res.stdout)["rejects"]["total"] == 2
    assert out.read_bytes() == ref
    assert first.stat().st_ino == before  # map task 0 was not redone
    assert sorted(p.name for p in done.iterdir()) == ["00000", "00001", "00002"]
    assert not list(tmp_path.glob(".o.jsonl.tmp-*"))
    assert not list(work.glob("*/.*.tmp-*"))


def test_stale_work_dir_from_other_inputs_is_not_reused(scenario_dump, scenario_run, tmp_path):
    _, inp = scenario_dump
    out = tmp_path / "o.jsonl"
    work = tmp_path / ".o.jsonl.work"
    claim_work(work, "reddit")  # an earlier run's work directory: ours, but of other inputs
    (work / "map" / "task-00000").mkdir(parents=True)
    (work / "fingerprints.json").write_text(json.dumps({"map": {"files": []}}))
    (work / "map" / "task-00000" / "bucket-00000.bin").write_bytes(b"garbage")
    (work / "executor" / "map" / "completions").mkdir(parents=True)
    (work / "executor" / "map" / "completions" / "00000").write_text("")
    run(RedditConfig(input=str(inp), output=str(out), num_buckets=5))
    assert read_out(out) == scenario_run[1]
    assert not work.exists()
