"""engine=deepspeed: ZeRO 1/2/3 from the same config, equal to the FSDP2 engine, resuming exactly.

Runs use deepspeed 0.19.8 on gloo, one thread per rank: the interrupted ones launch the real
`torchrun ... train.py` (or `python train.py`); the ZeRO 1/2/3 comparison and the uninterrupted
reference run `train` on forked ranks (tests/opt_train/conftest.py's `train_on_ranks`). Like
the FSDP2 engine, DeepSpeed on gloo is bitwise reproducible at a fixed world size and thread
count, so an interrupted-and-resumed run must give the uninterrupted run's losses exactly
(dropout on, so the RNG states must come back too).
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opt_train.engine.deepspeed import (
    deepspeed_config,
    load_weights_only,
    overflows_allowed_at_floor,
)
from opt_train.train.signals import EXIT_REQUEUE
from opt_train.train.trainer import Trainer
from tests.multirank import REPO, rank_env, torchrun_cmd
from tests.opt_train.conftest import make_config, small_job, train_on_ranks
from tests.opt_train.test_fault_tolerance import (
    BOUNDED,
    STEPS,
    TORCHRUN_SIGNALLED,
    job,
    losses,
    popen,
    preempt_after_resume,
    uninterrupted,
    wait_for,
)
from tests.opt_train.test_parallel import FP32_EVAL, launch
from tests.processes import kill_tree

NO_DROPOUT = ["model.dropout=0.0", "model.attention_dropout=0.0"]


def zero(stage: int, *extra: str) -> list[str]:
    return ["engine=deepspeed", f"deepspeed.stage={stage}", *extra]


# -- the config DeepSpeed gets ----------------------------------------------------------------


def test_deepspeed_config_carries_our_batch_clipping_precision_and_loss_scale():
    cfg = make_config(
        *zero(3, "deepspeed.offload_optimizer=true"),
        "precision=fp16",
        "data.seq_len=128",
        "train.micro_batch_size=2",
        "train.batch_tokens=4096",  # 32 sequences = 2 per micro-batch x 4 ranks x 4 steps
        "optim.clip_grad_norm=0.5",
        "loss_scale.init=8",
        "loss_scale.window=100",
    )
    ds = deepspeed_config(cfg, world=4, accum=cfg.grad_accum_steps(4))
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # our AdamW, nothing JIT-compiled
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: AdamW and the LR schedule
    fp16 = ds["fp16"]
    assert fp16["enabled"] and not ds["bf16"]["enabled"]
    assert 2 ** fp16["initial_scale_power"] == 8 and fp16["loss_scale_window"] == 100
    assert fp16["hysteresis"] == 1  # metaseq halves on every overflow


def test_fp16_stop_rule_counts_the_halvings_metaseq_would_make_below_one():
    # metaseq from scale 1 with min 2^-5: 1/2, 1/4, 1/8, 1/16, 1/32 (= min, still allowed),
    # then 1/64 < min stops the run on the 6th overflow in a row.
    assert overflows_allowed_at_floor(2.0**-5) == 6
    assert overflows_allowed_at_floor(1.0) == 1
    assert overflows_allowed_at_floor(0.75) == 1
    assert overflows_allowed_at_floor(0.5) == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (zero(1, "parallel.tp=2"), "parallel.tp and parallel.dp_replicate must be 1"),
        (["engine=deepspeed", "deepspeed.stage=4"], "deepspeed.stage must be 1, 2 or 3"),
        (zero(3, "parallel.init=meta"), "parallel.init=meta is not available"),
        (["engine=deepspeedd"], "engine must be fsdp or deepspeed"),
    ],
)
def test_bad_deepspeed_settings_stop_at_start_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(*overrides)


def test_loading_refuses_a_pickled_object_that_is_not_a_tensor_or_deepspeed_state(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": Path("/etc/passwd")}, f)
    with pytest.raises(pickle.UnpicklingError, match="pathlib"):
        load_weights_only(f)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, f)
    assert load_weights_only(f)["module"]["w"].sum() == 2


def test_classes_another_library_allowed_process_wide_are_refused_and_kept_for_it(tmp_path):
    """torch's weights_only allowlist is process-wide: importing megatron-core (as
    tests/data_pipeline/test_convert.py does) adds pathlib.PosixPath to it. Our load allows
    only DeepSpeed's classes all the same, and gives the other library its list back."""
    from pathlib import PosixPath

    f = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "payload": PosixPath("/etc/passwd")}, f)
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([PosixPath])
    try:
        assert torch.load(f, weights_only=True)["payload"] == PosixPath("/etc/passwd")
        with pytest.raises(pickle.UnpicklingError, match="pathlib"):
            load_weights_only(f)
        assert PosixPath in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


# -- one process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offload_run(tmp_path_factory, small_shards) -> tuple[Path, str]:
    """`python train.py` of 3 steps on one process, ZeRO-2 with optimizer offload: its run_dir
    and its stderr, which lists every module the process imported (`-X importtime`)."""
    run = tmp_path_factory.mktemp("offload") / "run"
    overrides = job(run, small_shards, *NO_DROPOUT, *zero(2, "deepspeed.offload_optimizer=true"))
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "train.py", *overrides, "train.max_steps=3"],
        cwd=REPO,
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = "\n".join(x for x in r.stderr.splitlines() if not x.startswith("import time:"))
    assert r.returncode == 0, log[-3000:]
    return run, r.stderr


@pytest.mark.slow
def test_one_process_with_offload_equals_the_plain_loop_and_fsdp_refuses_its_checkpoint(
    tmp_path, small_shards, offload_run
):
    run, _ = offload_run
    plain = tmp_path / "plain"
    Trainer(make_config(*job(plain, small_shards, *NO_DROPOUT, "train.max_steps=3"))).fit()
    # One rank, the same fp32 arithmetic on the same samples; only DeepSpeed's flattened
    # parameter partition differs in layout, so the values agree to fp32 rounding.
    assert losses(run) == pytest.approx(losses(plain), rel=1e-6)

    ckpt = run / "checkpoints" / "step_00000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == "opt-train-deepspeed/1"
    assert any(name.startswith("deepspeed/") for name in meta["files"])
    assert {"state.json", "config.yaml", "rng/rank_00000.json"} <= set(meta["files"])
    with pytest.raises(ValueError, match="opt-train-deepspeed/1"):
        Trainer(small_job(run, small_shards, "train.max_steps=4"))


@pytest.mark.slow
def test_the_engine_starts_without_importing_torchs_inductor(offload_run):
    """DeepSpeed's ZeRO optimizers import its Muon kernels, whose `torch.compile` decorators
    import torch's inductor compiler (~3 s of CPU per rank); the engine imports them with the
    compile deferred to a first call that never comes. (torch._dynamo, which FSDP2 and
    DeepSpeed import, brings a few light inductor modules of its own: config, cpp_builder.)"""
    _, stderr = offload_run
    lines = [x for x in stderr.splitlines() if x.startswith("import time:")]
    imported = {x.rsplit("|", 1)[1].strip() for x in lines}
    muon = "deepspeed.runtime.zero.muon"
    # ZeRO's optimizer check ran and imported the kernels.
    assert {f"{muon}.original_muon", f"{muon}.muon_optimizer"} <= imported
    assert "torch._inductor.compile_fx" not in imported


# -- two ranks ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multirank
def test_zero_1_2_3_give_the_fsdp2_engines_losses_over_6_steps(
    tmp_path, small_shards, fp32_mesh_run
):
    # The FSDP2 x 2 run is test_parallel's (tiny, fp32, no dropout, 6 steps, evaluating every
    # 2), run once a session; each ZeRO run is the same config with the engine changed.
    fsdp = fp32_mesh_run(2)
    want = losses(fsdp)
    assert sorted(want) == list(range(1, 7))
    fsdp_rows = [json.loads(x) for x in (fsdp / "metrics.jsonl").read_text().splitlines()]
    for stage in (1, 2, 3):
        run = tmp_path / f"zero{stage}"
        launch(2, run, small_shards, *FP32_EVAL, *zero(stage))
        got = losses(run)
        # fp32 gradients averaged by another collective (all-reduce or reduce-scatter in
        # another order): a few fp32 roundings (2^-24 = 6e-8) per step; measured 1.5e-7 for
        # each stage over these 6 steps. A different sample or LR would move the loss by ~1e-2.
        assert got == pytest.approx(want, rel=1e-6), f"ZeRO-{stage}"
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [sorted(r) for r in rows] == [sorted(r) for r in fsdp_rows]  # same fields
        assert all(math.isfinite(r["grad_norm"]) and not r["skipped"] for r in rows if "loss" in r)


@pytest.fixture(scope="module")
def zero3_reference(tmp_path_factory, small_shards) -> dict[int, float]:
    """The uninterrupted 2-rank ZeRO-3 run (dropout on) that interrupted runs must reproduce."""
    return uninterrupted(tmp_path_factory.mktemp("zero3") / "run", small_shards, *zero(3))


@pytest.mark.slow
@pytest.mark.multirank
def test_sigkill_then_sigusr1_each_resume_and_the_run_ends_with_bit_identical_losses(
    tmp_path, small_shards, zero3_reference
):
    """One run interrupted twice, then finished: SIGKILLed mid-run, then, rerun, preempted
    through torchrun with SIGUSR1, which saves at the current step and exits 85; the last rerun
    continues from that save. Both interruptions resume, and the finished run has the
    uninterrupted run's losses bit for bit (one sequence instead of one per signal: the
    reference and each resume are the same either way)."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # SIGKILL. The test hook holds each save for 1 s before it becomes visible (training goes
    # on), so the kill lands mid-run.
    slow = job(run, small_shards, *zero(3), "checkpoint.debug_delay_s=1")
    with popen(torchrun_cmd(2, slow), tmp_path / "kill.log") as proc:
        wait_for(
            lambda: (ckpts / "step_00000003").is_dir() and len(losses_or_empty(run)) >= 4, proc
        )
        kill_tree(proc.pid)
        proc.wait()
    killed_at = max(losses(run))
    assert killed_at < STEPS, "the kill came after the run had finished"

    # SIGUSR1 to the rerun once it has resumed: it stops after the step it is in, before STEPS.
    torchrun_status, log = preempt_after_resume(
        job(run, small_shards, *zero(3), "train.max_steps=100000", *BOUNDED),
        ckpts,
        tmp_path / "usr1.log",
    )
    assert torchrun_status == TORCHRUN_SIGNALLED, log[-3000:]  # workers 85, torchrun 1
    assert log.count(f"exiting with status {EXIT_REQUEUE}") == 2, log[-3000:]
    stopped = max(losses(run))
    assert (ckpts / f"step_{stopped:08d}" / "meta.json").is_file()
    assert stopped < STEPS, f"the signal landed at step {stopped}, after the last step"

    # The last rerun on forked ranks: what is left to check is the resume, not the launch.
    resumed = f"resumed from {ckpts / f'step_{stopped:08d}'}"
    train_on_ranks(2, job(run, small_shards, *zero(3)), says=(resumed,))
    assert losses(run) == zero3_reference  # bit for bit


def losses_or_empty(run: Path) -> dict[int, float]:
    return losses(run) if (run / "metrics.jsonl").is_file() else {}
