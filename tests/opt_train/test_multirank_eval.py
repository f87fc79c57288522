"""Evaluation and fp16 loss scaling under several ranks (real gloo ranks running `train`,
tests/opt_train/conftest.py's `train_on_ranks`): the validation loss is the same number at 1
and 2 ranks (one fixed validation set), and an fp16 overflow is skipped by every rank alike
(the 2-rank run follows the 1-process run)."""

import json

import pytest

from tests.multirank import spawn
from tests.opt_train.test_parallel import launch


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.multirank
def test_val_loss_is_the_same_at_one_and_two_ranks(fp32_mesh_run):
    # test_parallel's fp32 runs (FP32_EVAL: 6 steps, 4 validation batches every 2 steps), which
    # its mesh test also reads: run once a session.
    one = {r["step"]: r["val_loss"] for r in rows(fp32_mesh_run(1)) if "val_loss" in r}
    two = {r["step"]: r["val_loss"] for r in rows(fp32_mesh_run(2)) if "val_loss" in r}
    assert sorted(one) == sorted(two) == [2, 4, 6]
    # The same 8 windows in the same batches of 2; only the weights after 2, 4 and 6 steps of
    # training differ, by fp32 reductions in another order (~1e-6 relative). Another set of
    # windows (as when each rank took its own 4 batches) moves the mean by ~1e-2.
    assert two == pytest.approx(one, rel=1e-5)


FP16 = [
    "precision=fp16",
    "train.max_steps=14",
    # 2^30: fp16 gradients overflow until the scale has halved to one that fits; with the
    # default 256-step window it does not double again in this run. The runs are
    # deterministic, so the step where the scale first fits is the same on every run.
    "loss_scale.init=1073741824",
]


@pytest.mark.slow
@pytest.mark.multirank
def test_fp16_overflows_are_skipped_and_the_two_rank_run_follows_one_process(
    tmp_path, small_shards
):
    launch(1, tmp_path / "one", small_shards, *FP16)
    launch(2, tmp_path / "two", small_shards, *FP16)
    one = [r for r in rows(tmp_path / "one") if "loss" in r]
    two = [r for r in rows(tmp_path / "two") if "loss" in r]
    skipped = [r["skipped"] for r in one]
    k = skipped.index(False)
    assert k > 0 and all(skipped[:k]) and not any(skipped[k:])  # overflowed, then trained
    assert [r["skipped"] for r in two] == skipped
    assert [r["loss_scale"] for r in two] == [2.0 ** (30 - min(i, k)) for i in range(14)]
    assert [r["loss_scale"] for r in one] == [r["loss_scale"] for r in two]
    # Both runs compute in fp16 alike; only the order of the fp32 gradient sums differs, and an
    # fp16 rounding that flips because of it moves the mean loss by less than one fp16 unit
    # roundoff, 2^-11 = 4.9e-4 (measured at most 5.4e-5, at step 13). A rank that stepped while
    # its peer skipped would leave the model half-updated, far outside that.
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=2**-11)


def _overflow_on_one_rank(rank: int, world: int) -> None:
    import torch

    from opt_train.config import LossScaleConfig
    from opt_train.engine.precision import DynamicLossScaler

    scaler = DynamicLossScaler(LossScaleConfig(init=8.0), enabled=True)
    p = torch.nn.Parameter(torch.zeros(4))
    # FSDP gives each rank a shard of the reduced gradient: an inf lands in one rank's shard.
    p.grad = torch.tensor([8.0, 16.0, float("inf") if rank == 1 else 24.0, 32.0])
    overflow = scaler.found_overflow([p])
    scaler.update(overflow)
    assert overflow and scaler.scale == 4.0, (rank, overflow, scaler.scale)


@pytest.mark.slow
@pytest.mark.multirank
def test_an_overflow_on_one_rank_is_an_overflow_on_every_rank():
    spawn(_overflow_on_one_rank, 2)
