"""The goodput ledger (opt_train/train/goodput.py, callbacks/goodput.py): wall time split into
productive training and each kind of loss, carried across a SIGKILL and restart in the
checkpoint, on real clocks, real processes and real write faults. The killed-and-resumed run
also checks provenance after a resume (the spike row names the garbage documents)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opt_train.data.loader import GlobalOrderLoader, PackedWindows
from opt_train.data.provenance import compact, step_documents
from opt_train.tools.provenance import main as provenance_main
from opt_train.train.callbacks.base import Callback
from opt_train.train.goodput import GoodputLedger
from opt_train.train.trainer import Trainer
from tests.multirank import REPO, rank_env
from tests.opt_train.conftest import small_job
from tests.opt_train.garbage import SEQ, STABLE, garbage_steps, overrides, rows
from tests.opt_train.test_fault_tolerance import popen, wait_for
from tests.opt_train.test_provenance import garbage_docs

LOST = ("startup", "restart", "evaluation", "checkpoint", "failed_save", "rollback", "replay")


def parts(row: dict) -> dict[str, float]:
    return {
        k[len("goodput/") : -2]: v
        for k, v in row.items()
        if k.startswith("goodput/") and k.endswith("_s") and k != "goodput/wall_s"
    }


def check_sums(row: dict) -> None:
    """The parts add up to the wall time (1%; they are rounded to the millisecond), and the
    fraction is productive / wall."""
    got = parts(row)
    assert set(got) == {"productive", *LOST}, got
    assert all(v >= 0 for v in got.values()), got
    wall = row["goodput/wall_s"]
    assert sum(got.values()) == pytest.approx(wall, rel=0.01), (sum(got.values()), wall)
    assert row["goodput"] == pytest.approx(got["productive"] / wall, rel=1e-3, abs=1e-4)


def test_time_goes_to_the_innermost_bracket_and_a_failed_save_is_moved_to_failed_save():
    ledger = GoodputLedger(start=time.time())
    ledger.begin_step(1)
    time.sleep(0.05)
    with ledger.bracket("evaluation", 1):
        time.sleep(0.05)
        with ledger.bracket("checkpoint", 1):
            time.sleep(0.05)
    with ledger.bracket("checkpoint", 2):
        time.sleep(0.05)
    ledger.save_failed(2)  # an async save's failure, reported after its bracket closed
    with ledger.bracket("checkpoint", 3):
        time.sleep(0.05)
        ledger.save_failed(3)  # a sync one's, reported inside it
        time.sleep(0.05)
    got, wall = ledger.totals()
    for kind, least in [("productive", 0.05), ("evaluation", 0.05), ("checkpoint", 0.05)]:
        assert got[kind] >= least, (kind, got)
    assert got["failed_save"] >= 0.15, got
    # Each sleep is counted once: a kind's time is at most its sleeps plus the scheduler's
    # lateness, which the whole wall bounds.
    assert sum(got.values()) == pytest.approx(wall, rel=1e-9)
    assert wall < 0.3 + 2.0


def test_a_rollback_moves_the_undone_step_to_rollback_and_keeps_the_ledger():
    ledger = GoodputLedger(start=time.time())
    for step in (1, 2, 3):
        ledger.begin_step(step)
        time.sleep(0.02)
    saved = json.loads(json.dumps(ledger.state_dict()))  # what state.json holds
    ledger.rolled_back(3)
    ledger.load_state_dict(saved)  # the rollback's checkpoint load: ignored
    before, _ = ledger.totals()
    assert before["rollback"] >= 0.02 and before["productive"] >= 0.04, before
    ledger.begin_step(2)  # trained again: lost
    time.sleep(0.02)
    ledger.begin_step(3)  # its first training was moved to rollback: this one counts
    time.sleep(0.02)
    ledger.begin_step(4)
    after, _ = ledger.totals()
    assert after["rollback"] - before["rollback"] >= 0.02
    assert after["productive"] - before["productive"] >= 0.02
    # A resume loads the earlier processes' totals and counts on from there.
    resumed = GoodputLedger(start=time.time())
    resumed.load_state_dict(saved)
    resumed.begin_step(3)
    assert resumed.processes == 2
    got, wall = resumed.totals()
    assert got["productive"] >= saved["parts"]["productive"]
    assert got["replay"] > 0 and got["restart"] > 0 and got["startup"] == saved["parts"]["startup"]
    assert wall >= saved["wall_s"]


class _FullDisk(Callback):
    """Before step `step`, a directory where the save of `step` writes state.json: the save
    fails with the kernel's EISDIR, as a real write fault does."""

    def __init__(self, step: int):
        self.step = step

    def pre_step(self, trainer) -> None:
        if trainer.step == self.step and trainer.dist.is_main:
            (trainer.ckpt.dir / f".tmp-step_{self.step:08d}" / "state.json").mkdir(parents=True)


def test_rows_at_each_evaluation_and_at_the_end_add_up_and_the_console_prints_one_line(
    tmp_path, small_shards, capsys
):
    run = tmp_path / "run"
    cfg = small_job(
        run,
        small_shards,
        "train.max_steps=8",
        "train.eval_interval=2",
        "train.eval_batches=2",
        "checkpoint.interval=3",
        "checkpoint.async_save=false",
        "logging.progress=true",
        "logging.console=lines",
    )
    Trainer(cfg, callbacks=[_FullDisk(6)]).fit()
    got = [r for r in rows(run) if r.get("event") == "goodput"]
    assert [r["step"] for r in got] == [2, 4, 6, 8]  # after each evaluation; the end's
    for r in got:
        check_sums(r)
    final = parts(got[-1])
    assert final["evaluation"] > parts(got[0])["evaluation"] > 0
    assert final["checkpoint"] > 0 and final["failed_save"] > 0
    assert [r["step"] for r in rows(run) if r.get("event") == "checkpoint_failed"] == [6]
    # The loop's timer of each step is inside the step's productive time.
    step_time = sum(r["step_time_s"] for r in rows(run) if "loss" in r and "event" not in r)
    assert final["productive"] >= step_time
    assert final["restart"] == final["replay"] == final["rollback"] == 0
    # The checkpoint carries the ledger as of its save.
    state = json.loads((run / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["goodput"]["processes"] == 1 and state["goodput"]["high_water"] == 3
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("goodput ")]
    assert len(lines) == 1 and "wall time (1 process)" in lines[0], lines
    assert f"{100 * got[-1]['goodput']:.1f}%" in lines[0]


def with_validation(shards: Path, out: Path) -> Path:
    """A copy of a shard set whose validation split is its train split's files (the garbage
    corpus has no validation split, and the must-show run evaluates)."""
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    split = json.loads(json.dumps(manifest["splits"]["train"]))
    for shard in split["shards"]:
        for kind in ("tokens", "index"):
            name = shard[kind].replace("train-", "validation-")
            shutil.copyfile(out / shard[kind], out / name)
            shard[kind] = name
    manifest["splits"]["validation"] = split
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


@pytest.mark.slow
def test_a_killed_restarted_rolled_back_run_accounts_for_its_wall_time(
    tmp_path, garbage_corpus, capsys
):
    """`python train.py` SIGKILLed after step 22 (checkpoint 20 on disk), then the same
    command to the end: it replays the steps after 20, evaluates every 5 steps, and at step 27
    (a garbage window) rolls back to 25."""
    shards, bad = garbage_corpus
    assert garbage_steps(shards, bad, 17, 1, 28) == [27]
    data = with_validation(shards, tmp_path / "data")
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        *overrides(run, data, "train.seed=17", "train.max_steps=28", *STABLE),
        "train.eval_interval=5",
        "train.eval_batches=2",
        "checkpoint.async_save=false",
    ]
    t0 = time.time()
    with popen(cmd, tmp_path / "first.log") as proc:
        wait_for(
            lambda: (
                (run / "checkpoints" / "step_00000020").is_dir()
                and max((r["step"] for r in _rows(run) if "loss" in r), default=0) >= 22
            ),
            proc,
            timeout=300,
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = time.time() - t0
    reached = max(r["step"] for r in _rows(run) if "loss" in r and "event" not in r)
    newest = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert newest == 20 and 22 <= reached < 25, (newest, reached)
    first = json.loads((run / "checkpoints" / "step_00000020" / "state.json").read_text())
    first = first["goodput"]
    assert 0 < first["wall_s"] <= killed_at

    t1 = time.time()
    second = subprocess.run(
        cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600
    )
    lifetime = time.time() - t1
    assert second.returncode == 0, second.stderr[-3000:]
    final = [r for r in rows(run) if r.get("event") == "goodput"][-1]
    assert final["step"] == 28 and final["goodput/processes"] == 2
    check_sums(final)
    got = parts(final)
    assert all(got[k] > 0 for k in ("productive", "startup", "restart", "evaluation"))
    assert all(got[k] > 0 for k in ("checkpoint", "rollback", "replay")), got
    assert got["failed_save"] == 0
    # Wall time: the first process's as its checkpoint recorded it, and the second's, which
    # ran inside the lifetime this test saw.
    assert 0 < final["goodput/wall_s"] - first["wall_s"] <= lifetime
    # The replayed steps (21..reached) and those trained again after the rollback (26) are
    # lost time, at least what the loop's timer saw of them; the spike step 27's first
    # training is the rollback's too.
    steps = {r["step"]: r for r in rows(run) if "loss" in r and "event" not in r}
    assert sorted(steps) == list(range(1, 29))
    assert got["replay"] >= sum(steps[s]["step_time_s"] for s in range(21, reached + 1))
    assert got["rollback"] >= steps[26]["step_time_s"]
    evals = [r["step"] for r in rows(run) if "val_loss" in r]
    assert evals == [5, 10, 15, 20, 25]
    assert [r["step"] for r in rows(run) if r.get("event") == "goodput"] == [*evals, 28]

    # Provenance after a resume: the spike (in the second process) names the documents of
    # original step 27, the garbage one among them, and the CLI prints its text.
    spike = next(r for r in rows(run) if r.get("event") == "spike")
    assert spike["step"] == 27
    loader = GlobalOrderLoader(PackedWindows(data, "train", SEQ), 17, 1, 1)
    assert spike["documents"] == json.loads(json.dumps(compact(step_documents(loader, 27))))
    garbage = garbage_docs(shards)
    named = [d for _, _, d in spike["documents"] if d in garbage]
    assert named
    capsys.readouterr()
    provenance_main([str(run), "step=27"])
    out = capsys.readouterr().out
    assert "spike at step 27" in out and garbage[named[0]][:200] in out


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl's whole rows so far (a line being written is left out)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
