"""Resuming into a run_dir checks the new config against the checkpoint's (opt_train/checkpoint/resume_guard.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from opt_train.checkpoint.resume_guard import ResumeRefused
from opt_train.train.trainer import Trainer
from tests.opt_train.conftest import REPO, small_job


def _train(run_dir, data, *extra: str) -> Trainer:
    t = Trainer(small_job(run_dir, data, *extra))
    t.fit()
    t.close()
    return t


@pytest.fixture
def run_with_checkpoint(tmp_path, small_shards):
    """A run_dir holding a checkpoint at step 2 (lr 0.01, d_model 32, seq_len 32)."""
    run_dir = tmp_path / "run"
    _train(run_dir, small_shards, "train.max_steps=2")
    return run_dir


def _rows(run_dir) -> list[dict]:
    """metrics.jsonl's rows but the goodput ledger's (timings, in every run)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") != "goodput"]


def test_model_and_data_changes_are_refused_before_any_weight_is_read(
    run_with_checkpoint, small_shards
):
    cfg = small_job(
        run_with_checkpoint,
        small_shards,
        "train.max_steps=4",
        "model.d_model=64",
        "data.seq_len=16",
        "optim.lr=0.005",
        "checkpoint.allow_changes=[optim.lr]",
    )
    with pytest.raises(ResumeRefused) as e:
        Trainer(cfg)
    msg = str(e.value)
    assert "step_00000002 (step 2)" in msg
    assert "model.d_model: 32 -> 64" in msg and "data.seq_len: 32 -> 16" in msg
    assert "never change" in msg and "optim.lr" not in msg  # allowed, so not named
    assert len(_rows(run_with_checkpoint)) == 2  # nothing was trained or logged


def test_other_changes_need_allow_changes_and_are_logged_as_events(
    run_with_checkpoint, small_shards
):
    changed = ("train.max_steps=3", "optim.lr=0.005", "optim.clip_grad_norm=0.3")
    with pytest.raises(ResumeRefused) as e:
        Trainer(small_job(run_with_checkpoint, small_shards, *changed))
    msg = str(e.value)
    assert "optim.lr: 0.01 -> 0.005" in msg and "optim.clip_grad_norm: 1.0 -> 0.3" in msg
    assert "checkpoint.allow_changes=[optim.clip_grad_norm,optim.lr]" in msg
    assert "train.max_steps" not in msg  # always allowed

    allow = "checkpoint.allow_changes=[optim]"  # a whole group
    t = _train(run_with_checkpoint, small_shards, *changed, allow)
    assert t.resumed_step == 2 and t.step == 3
    rows = _rows(run_with_checkpoint)
    events = [r for r in rows if r.get("event") == "config_change"]
    assert events == [
        {
            "event": "config_change",
            "step": 2,
            "key": "optim.clip_grad_norm",
            "old": 1.0,
            "new": 0.3,
        },
        {"event": "config_change", "step": 2, "key": "optim.lr", "old": 0.01, "new": 0.005},
        {"event": "config_change", "step": 2, "key": "train.max_steps", "old": 2, "new": 3},
    ]
    step3 = next(r for r in rows if r.get("step") == 3 and "loss" in r)
    # warmup ends at step 2, decay to 10% at step 32: one step of decay from the new peak
    assert step3["lr"] == pytest.approx(0.005 * (1 - 0.9 / 30))


def test_max_steps_may_grow_and_free_keys_change_silently(run_with_checkpoint, small_shards):
    t = _train(
        run_with_checkpoint,
        small_shards,
        "train.max_steps=3",
        "checkpoint.interval=7",
        "train.micro_batch_size=2",
        "logging.progress=true",
    )
    assert t.step == 3
    events = [r for r in _rows(run_with_checkpoint) if "event" in r]
    assert [e["key"] for e in events] == ["train.max_steps"]


def test_a_nearer_max_steps_is_taken_and_logged(run_with_checkpoint, small_shards):
    t = _train(run_with_checkpoint, small_shards, "train.max_steps=1")
    assert t.resumed_step == 2 and t.step == 2  # nothing left to train
    events = [r for r in _rows(run_with_checkpoint) if "event" in r]
    assert events == [
        {"event": "config_change", "step": 2, "key": "train.max_steps", "old": 2, "new": 1}
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("optim.lrr", "unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
        ("model.d_model", "lists 'model.d_model', but model.d_model can never change"),
        ("data", "data.path, data.sources, data.seq_len"),
    ],
)
def test_allow_changes_entries_are_checked(run_with_checkpoint, small_shards, entry, message):
    with pytest.raises(ResumeRefused) as e:
        Trainer(small_job(run_with_checkpoint, small_shards, f"checkpoint.allow_changes=[{entry}]"))
    assert message in str(e.value)


def _train_py(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


SMALL = [
    "model.vocab_size=512",
    "model.d_model=32",
    "data.seq_len=32",
    "train.batch_tokens=256",
    "train.max_steps=1",
    "train.eval_interval=0",
    "precision=fp32",
    "logging.wandb=disabled",
    "logging.progress=false",
]


@pytest.mark.slow
def test_multirun_jobs_get_their_own_run_dir_and_a_refusal_is_one_message(tmp_path, small_shards):
    data = f"data.path={small_shards}"
    r = _train_py(tmp_path, "-m", data, *SMALL, "optim.lr=0.01,0.02")
    assert r.returncode == 0, r.stderr[-3000:]
    base = tmp_path / "runs" / "opt-tiny"  # the default run_dir, runs/${model.name}
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["0", "1"]
    lrs = [_rows(base / j)[0]["lr"] for j in ("0", "1")]
    assert lrs[1] == pytest.approx(2 * lrs[0])  # two runs, not one resumed by the other
    r = _train_py(tmp_path, data, f"run_dir={base / '0'}", *SMALL, "optim.lr=0.03")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == "  optim.lr: 0.01 -> 0.03"
    assert "Traceback" not in r.stderr
