"""Automatic loss-spike recovery (opt_train/train/callbacks/stability.py) on a corpus with garbage documents
(tests/opt_train/garbage.py says how it is built and where its garbage windows fall)."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opt_train.train.callbacks.base import Callback
from opt_train.train.callbacks.stability import EXIT_ROLLBACK_LIMIT
from opt_train.train.trainer import Trainer
from tests.opt_train.conftest import make_config, small_job, train_on_ranks
from tests.opt_train.garbage import (
    STABLE,
    TWO_RANKS,
    garbage_steps,
    overrides,
    rows,
    steps,
)


def job(run_dir: Path, data: Path, *extra: str):
    return make_config(*overrides(run_dir, data, *extra))


@pytest.mark.slow
def test_spikes_are_detected_rolled_back_and_skipped_and_the_replay_is_exact(
    tmp_path, garbage_corpus
):
    data, bad = garbage_corpus
    seed = "train.seed=17"
    assert garbage_steps(data, bad, 17, 1, 45) == [27, 31]

    # A plain run's loss jumps at the steps that read garbage.
    plain = tmp_path / "plain"
    Trainer(job(plain, data, seed, "train.max_steps=32")).fit()
    loss = {s: r["loss"] for s, r in steps(plain).items()}
    clean = statistics.median(loss[s] for s in range(18, 27))
    assert clean < 6
    assert loss[27] > 2 * clean and loss[31] > 2 * clean, (clean, loss[27], loss[31])

    # With stability on; the process dies after step 33 (checkpoint 30 holds both rollbacks'
    # decisions) and the same command resumes it.
    auto = tmp_path / "auto"
    cfg = job(auto, data, seed, "train.max_steps=36", "checkpoint.async_save=false", *STABLE)
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(cfg, callbacks=[_Crash(33)]).fit()
    resumed = Trainer(cfg)
    assert resumed.step == 30
    resumed.fit()
    got = steps(auto)
    assert sorted(got) == list(range(1, 37))  # every step once
    events = [r for r in rows(auto) if "event" in r]
    spikes = [e for e in events if e["event"] == "spike"]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert [(e["step"], e["reason"], e["action"]) for e in spikes] == [
        (27, "loss", "rollback"),
        (29, "loss", "rollback"),
    ]
    assert spikes[0]["value"] == loss[27]  # the plain run's step 27, before any difference
    assert [(e["step"], e["to_step"], e["skip_steps"]) for e in rollbacks] == [
        (27, 25, [26, 27]),
        (29, 25, [26, 31]),  # step 29 read the batch of original step 31
    ]
    assert [e["lr_change"] for e in rollbacks] == [[26, 30, 0.5], [26, 30, 0.5]]
    # The final curve has no jump left, and no garbage window was trained on.
    late = [got[s]["loss"] for s in range(18, 37)]
    assert max(late) < 1.5 * statistics.median(late)
    skips = [tuple(r) for r in rollbacks[-1]["data_skip_steps"]]
    assert garbage_steps(data, bad, 17, 1, 36, skips) == []
    # The LR changes are in the rows: two rollbacks to 25 halved it twice for steps 26-30.
    assert got[27]["lr"] == pytest.approx(0.25 * steps(plain)[27]["lr"])

    # Exactness: a fresh run resumed from checkpoint 25 with the same skip list and LR changes
    # given by hand equals the recovered run from the rollback on, bit for bit.
    manual = tmp_path / "manual"
    (manual / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        auto / "checkpoints" / "step_00000025", manual / "checkpoints" / "step_00000025"
    )
    lr_changes = [e["lr_change"] for e in rollbacks]
    Trainer(
        job(
            manual,
            data,
            seed,
            "train.max_steps=36",
            f"data.skip_steps={[list(s) for s in skips]}",
            f"optim.lr_changes={lr_changes}",
        )
    ).fit()
    replay = steps(manual)
    assert sorted(replay) == list(range(26, 37))
    for s in range(26, 37):
        for key in ("loss", "grad_norm", "lr"):
            assert replay[s][key] == got[s][key], (s, key)


class _Crash(Callback):
    """Dies after a step, as a killed process would (no final save)."""

    def __init__(self, step: int):
        self.step = step

    def post_step(self, trainer) -> None:
        if trainer.step == self.step:
            raise RuntimeError("killed")


def test_a_clean_run_raises_no_alarm(tmp_path, small_shards):
    run = tmp_path / "run"
    cfg = small_job(
        run,
        small_shards,
        "train.max_steps=60",
        "train.micro_batch_size=1",
        "train.batch_tokens=32",
        "checkpoint.interval=10",
        "stability.enabled=true",
        "stability.window=10",
        "stability.grad_factor=5",
    )
    Trainer(cfg).fit()
    assert not [r for r in rows(run) if "event" in r and r["event"] != "goodput"]
    assert sorted(steps(run)) == list(range(1, 61))


def test_the_window_must_fit_in_the_kept_checkpoints(tmp_path, small_shards):
    with pytest.raises(ValueError, match="checkpoint.keep >= 3"):
        small_job(
            tmp_path,
            small_shards,
            "stability.enabled=true",
            "stability.window=10",
            "checkpoint.interval=5",
            "checkpoint.keep=2",
        )


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["parallel.dp_shard=2", "parallel.tp=2"], ids=["fsdp2", "tp2"])
def test_two_ranks_roll_back_alike_and_equal_the_replay_by_hand(
    tmp_path, garbage_corpus, two_rank_rollback, mesh
):
    """2 real gloo ranks, two sequences per step: FSDP2 (one sequence per rank) or TP 2 (both
    ranks read both sequences, one micro-batch each); the loss and gradient norm that the
    detector reads are reduced over the ranks either way."""
    data, bad = garbage_corpus
    assert garbage_steps(data, bad, 21, 2, 45) == [23]
    auto = two_rank_rollback(mesh)
    rollbacks = [r for r in rows(auto) if r.get("event") == "rollback"]
    assert [(e["step"], e["to_step"], e["skip_steps"]) for e in rollbacks] == [(23, 20, [21, 23])]
    got = steps(auto)
    assert sorted(got) == list(range(1, 25))
    manual = tmp_path / "manual"
    (manual / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        auto / "checkpoints" / "step_00000020", manual / "checkpoints" / "step_00000020"
    )
    train_on_ranks(
        2,
        overrides(
            manual,
            data,
            *TWO_RANKS,
            mesh,
            "data.skip_steps=[[21,23]]",
            f"optim.lr_changes=[{rollbacks[0]['lr_change']}]",
        ),
    )
    replay = steps(manual)
    assert sorted(replay) == list(range(21, 25))
    for s in range(21, 25):
        for key in ("loss", "grad_norm", "lr"):
            assert replay[s][key] == got[s][key], (s, key)


@pytest.mark.slow
def test_rollback_limit_exit_status_through_train_py(tmp_path, garbage_corpus):
    """The real command exits with the distinct status."""
    data, _ = garbage_corpus
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            *overrides(tmp_path / "run", data, "train.seed=17", "train.max_steps=30", *STABLE),
            "stability.max_rollbacks=1",
        ],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == EXIT_ROLLBACK_LIMIT, out.stderr[-3000:]
    assert "max_rollbacks=1" in out.stderr
    run = tmp_path / "run"
    last = rows(run)[-1]
    assert (last["event"], last["step"], last["action"]) == ("spike", 29, "stop")
    # The checkpoints are left as they were: nothing is saved after the spike.
    assert max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*")) == 25


class _Poison(Callback):
    """Before step `step` (once), a NaN into the weights: every later step is NaN until the
    weights are restored."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def pre_step(self, trainer) -> None:
        if trainer.step == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                next(trainer.model.parameters()).mul_(float("nan"))


# The poisoned rollback run is checked once, with the bar and wandb on: test_observability's
# rolled_back_run fixture.
