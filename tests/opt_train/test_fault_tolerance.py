"""What clusters do to a run, done for real: SIGKILL (mid-training and mid-save), preemption
signals, torchrun restarts, a different mesh after a restart, a hung peer, NaN losses.

Multi-rank tests launch the real `torchrun ... train.py` on gloo with one thread per rank;
gloo FSDP2 runs are bitwise reproducible at a fixed world size and thread count, so an
interrupted-and-resumed run must give the uninterrupted run's losses exactly (dropout on, so
the RNG states must come back too).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from opt_train.data.loader import GlobalOrderLoader, PackedWindows
from opt_train.train.signals import EXIT_REQUEUE
from opt_train.train.trainer import NonFiniteLoss, Trainer
from tests.multirank import REPO, free_port, rank_env, torchrun_cmd
from tests.opt_train.conftest import small_job, train_on_ranks
from tests.processes import children, kill_tree, started

TINY = [
    "model.vocab_size=512",
    "model.d_model=32",
    "model.n_heads=4",
    "model.dropout=0.1",
    "model.attention_dropout=0.1",
    "data.seq_len=32",
    "train.micro_batch_size=2",
    "train.batch_tokens=256",
    "train.eval_interval=0",
    "precision=fp32",
    "logging.wandb=disabled",
    "logging.progress=false",
    "optim.lr=0.01",
    "optim.warmup_tokens=512",
    "optim.decay_tokens=8192",
    "checkpoint.interval=3",
]
STEPS = 12
# For a signal sent as soon as a rerun says where it resumed (step 3 or 6 in practice): the
# run stops after the step it is in. One save is in flight at a time and each is held 2 s
# before it becomes visible, so the run cannot pass the second save after the resume (which
# waits for the first) until 2 s later: a signal that arrives late still stops it before
# STEPS, and the resume after it is always checked.
BOUNDED = ["checkpoint.debug_delay_s=2"]
# torchrun's own status after it forwarded a signal its workers obeyed (docs/fault-tolerance.md).
TORCHRUN_SIGNALLED = 1


def job(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.path={data}", *TINY, f"train.max_steps={STEPS}", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged again after a restart keeps its last value."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@contextmanager
def popen_env(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`cmd` running with its output in `log`; whatever of it is alive at the end is killed."""
    with (
        open(log, "w") as out,
        started(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT) as proc,
    ):
        yield proc


def popen(cmd: list[str], log: Path):
    return popen_env(cmd, log, rank_env())


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, f"exited with {proc.returncode} before the condition held"
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(0.02)


def preempt_after_resume(overrides: list[str], ckpts: Path, log: Path) -> tuple[int, str]:
    """A 2-rank torchrun rerun of `overrides`, sent SIGUSR1 once it says it resumed from
    `ckpts` (the handlers are installed first thing, so the signal is not lost), which torchrun
    forwards to both workers; returns torchrun's exit status and the log."""
    args = ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=60"]
    with popen(torchrun_cmd(2, overrides, args), log) as proc:
        wait_for(lambda: "resumed from " + str(ckpts) in log.read_text(), proc)
        proc.send_signal(signal.SIGUSR1)
        status = proc.wait(timeout=60)
    return status, log.read_text()


def uninterrupted(run: Path, data: Path, *extra: str) -> dict[int, float]:
    """The losses of an uninterrupted 2-rank run of `job`, one for every step (`train` on
    forked ranks: the runs compared with it are the torchrun ones)."""
    train_on_ranks(2, job(run, data, *extra))
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_shards) -> dict[int, float]:
    """The uninterrupted 2-rank FSDP2 run every interrupted run must reproduce."""
    return uninterrupted(tmp_path_factory.mktemp("reference") / "run", small_shards)


@pytest.mark.slow
@pytest.mark.multirank
def test_sigkill_during_a_save_then_sigusr1_under_torchrun_each_resume_and_end_bit_exact(
    tmp_path, small_shards, reference
):
    """One run interrupted twice, then finished: SIGKILLed mid-save (the previous checkpoint
    stays, the half-written one is removed on resume), then preempted through torchrun with
    SIGUSR1 (both workers save at the current step and exit 85); the last rerun ends with the
    uninterrupted run's losses bit for bit. (One sequence, not a test per signal: the reference
    and each resume are the same either way.)"""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # The test hook holds each save for 2 s between "DCP wrote every shard" and "visible";
    # training goes on meanwhile (async), so the kill lands mid-save and mid-training.
    cmd = torchrun_cmd(2, job(run, small_shards, "checkpoint.debug_delay_s=2"))
    with popen(cmd, tmp_path / "kill.log") as proc:
        wait_for(
            lambda: (ckpts / "step_00000003").is_dir() and (ckpts / ".tmp-step_00000006").is_dir(),
            proc,
        )
        time.sleep(0.5)
        kill_tree(proc.pid)
        proc.wait()
    assert not (ckpts / "step_00000006").exists()  # never visible half-written
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    killed_at = max(losses(run))
    assert killed_at < STEPS, "the kill came after the run had finished"

    # torchrun forwarding SIGUSR1 (SLURM's preemption warning) to both workers of the rerun:
    # it stops after the step it is in, well before STEPS.
    torchrun_status, log = preempt_after_resume(
        job(run, small_shards, "train.max_steps=100000", *BOUNDED), ckpts, tmp_path / "usr1.log"
    )
    assert "resumed from " + str(ckpts / "step_00000003") in log
    assert "removing" in log and ".tmp-step_00000006" in log
    # Each worker exits 85; torchrun itself then exits 1 (torch 2.13 re-raises the forwarded
    # signal as SignalException; docs/fault-tolerance.md), not killed by the signal (-10).
    assert torchrun_status == TORCHRUN_SIGNALLED, log[-3000:]
    assert log.count(f"exiting with status {EXIT_REQUEUE}") == 2, log[-3000:]
    stopped = max(losses(run))
    assert (ckpts / f"step_{stopped:08d}" / "meta.json").is_file()
    assert stopped < STEPS, f"the signal landed at step {stopped}, after the last step"

    # The last rerun continues the uninterrupted run exactly (on forked ranks: what is left
    # to check is the resume, not the launch).
    train_on_ranks(
        2, job(run, small_shards), says=(f"resumed from {ckpts / f'step_{stopped:08d}'}",)
    )
    assert losses(run) == reference  # bit for bit, recomputed after both resumes


@pytest.mark.slow
@pytest.mark.multirank
def test_resume_on_one_rank_and_on_tp2_reshards_and_continues_the_same_samples(
    tmp_path, small_shards
):
    """FSDP2 x 2 saves at step 3; the run continues on one process and on TP x 2, each from a
    copy of that checkpoint, with the losses of the FSDP2 x 2 run itself; the HF export
    consolidates the sharded checkpoint. (The FSDP2 x 2 run is run once, uninterrupted: a
    resume on the same mesh gives its losses bit for bit, test_sigkill_during_a_save_....)"""
    no_dropout = ["model.dropout=0.0", "model.attention_dropout=0.0"]  # other meshes draw
    # other dropout masks; without dropout only the reduction order differs
    keep = "checkpoint.keep=4"  # saves at 3, 6, 9 and 12: step 3 stays
    base = tmp_path / "fsdp"
    train_on_ranks(2, job(base, small_shards, *no_dropout, keep))
    exact = losses(base)
    assert sorted(exact) == list(range(1, STEPS + 1))
    one, tp = tmp_path / "one", tmp_path / "tp"
    for copy in (one, tp):  # the run as it was when step 3's checkpoint was its newest
        shutil.copytree(
            base / "checkpoints" / "step_00000003", copy / "checkpoints" / "step_00000003"
        )
        rows = (base / "metrics.jsonl").read_text().splitlines(keepends=True)
        (copy / "metrics.jsonl").write_text(
            "".join(r for r in rows if json.loads(r).get("step", 0) <= 3)
        )

    from transformers import OPTForCausalLM

    from opt_train.tools.hf_export import main as export
    from tests.opt_train.conftest import make_config

    export([str(one / "checkpoints" / "step_00000003"), str(tmp_path / "hf")])
    t = Trainer(make_config(*job(one, small_shards, *no_dropout, keep, "logging.peak_tflops=1")))
    assert t.step == 3 and t.loader.samples_seen == 3 * 8  # the same global sample
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, t.model.eval()(x), rtol=0, atol=1e-4)
    t.fit()
    # Same world size, other mesh: the RNG streams are not the saved ones.
    train_on_ranks(
        2,
        job(tp, small_shards, *no_dropout, keep, "parallel.tp=2"),
        says=("RNG streams start fresh",),
    )
    for name, run in (("one process", one), ("tp=2", tp)):
        got = losses(run)
        assert [got[s] for s in range(1, 4)] == [exact[s] for s in range(1, 4)], name
        # fp32 sums split over ranks in another order: a few fp32 roundings (2^-24 = 6e-8)
        # per step; measured 1.5e-7 over these 9 steps on one process and on tp=2. A one-sample
        # shift moves the loss by ~1e-2 here.
        assert got == pytest.approx(exact, rel=1e-6), name


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_exits_85(tmp_path, small_shards):
    # One process, signalled directly: `python train.py` exits with EXIT_REQUEUE. (torchrun
    # forwarding SIGUSR1 to two workers: the SIGKILL-then-SIGUSR1 sequence above.)
    solo = tmp_path / "solo"
    cmd = [sys.executable, "train.py", *job(solo, small_shards, "train.max_steps=100000")]
    with popen(cmd, tmp_path / "solo.log") as proc:
        wait_for(lambda: (solo / "checkpoints" / "step_00000003").is_dir(), proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == EXIT_REQUEUE
    stopped = max(losses(solo))
    assert (solo / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"


@pytest.mark.slow
@pytest.mark.multirank
def test_worker_killed_under_torchrun_max_restarts_is_restarted_and_resumes(
    tmp_path, small_shards, reference
):
    run = tmp_path / "run"
    args = ["--max-restarts=1", "--monitor-interval=0.2"]
    # The save hook slows the run (each save takes >= 1 s to publish) so the kill lands mid-run.
    cmd = torchrun_cmd(2, job(run, small_shards, "checkpoint.debug_delay_s=1"), args)
    with popen(cmd, tmp_path / "log") as proc:
        wait_for(lambda: (run / "checkpoints" / "step_00000003").is_dir(), proc)
        workers = children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        assert proc.wait(timeout=180) == 0, (tmp_path / "log").read_text()[-4000:]
    log = (tmp_path / "log").read_text()
    assert "(torchrun restart 1)" in log and "resumed from " + str(run / "checkpoints") in log
    assert losses(run) == reference


def agent_cmd(port: int, host: bool, overrides: list[str]) -> list[str]:
    """One of two torchrun agents ("nodes") of one job, rendezvousing over loopback."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--max-restarts=1",
        "--monitor-interval=0.2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=two-agents",
        # Both agents run on this machine, so say which one hosts the rendezvous store.
        f"--rdzv-conf=is_host={int(host)},last_call_timeout=1",
        "train.py",
        *overrides,
    ]


@pytest.mark.slow
@pytest.mark.multirank
def test_two_agents_one_killed_and_started_again_resume_and_finish(
    tmp_path, small_shards, reference
):
    run = tmp_path / "run"
    port = free_port()
    env = {**rank_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see fault-tolerance.md

    def agent(host: bool, log: str, *extra: str):
        cmd = agent_cmd(port, host, job(run, small_shards, *extra))
        return popen_env(cmd, tmp_path / log, env)

    with agent(True, "a.log", "checkpoint.debug_delay_s=1") as a:
        time.sleep(0.5)  # the host agent binds the rendezvous port first
        with agent(False, "b.log", "checkpoint.debug_delay_s=1") as b:
            wait_for(lambda: (run / "checkpoints" / "step_00000003").is_dir(), b)
            kill_tree(b.pid)  # the node dies: agent and worker
            b.wait()
        with agent(False, "b2.log") as b2:
            assert a.wait(timeout=180) == 0, (tmp_path / "a.log").read_text()[-4000:]
            assert b2.wait(timeout=60) == 0, (tmp_path / "b2.log").read_text()[-4000:]
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b2.log").read_text()
    assert "resumed from " + str(run / "checkpoints") in logs
    assert losses(run) == reference


# -- a hung peer -----------------------------------------------------------------------------


def _hang_or_wait(rank: int, port: int, out) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
        }
    )
    import torch.distributed as dist

    from opt_train.parallel.process_groups import init_distributed, name_the_rank_on_timeout

    init_distributed("cpu", timeout_s=2)
    if rank == 1:
        time.sleep(3600)  # hung: never enters the collective
    # The clock starts when rank 0 enters the collective its peer never joins: the process's
    # start-up and the rendezvous are not part of the timeout under test.
    t0 = time.monotonic()
    try:
        with name_the_rank_on_timeout(rank, 2):
            dist.all_reduce(torch.ones(1))
        out.put(("no error", time.monotonic() - t0))
    except Exception as e:
        out.put((f"{type(e).__name__}: {e}", time.monotonic() - t0))


@pytest.mark.slow
@pytest.mark.multirank
def test_a_hung_peer_becomes_an_error_naming_the_rank_after_the_timeout():
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")  # tests/multirank.py's server, torch already imported
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_hang_or_wait, args=(r, port, out)) for r in range(2)]
    try:
        for p in procs:
            p.start()
        # Start-up (the process, the rendezvous) took over 60 s on a loaded machine;
        # it is bounded only by this get, and rank 0 times the collective itself.
        msg, waited = out.get(timeout=300)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert msg.startswith("CollectiveTimeout: rank 0: a collective timed out after 2 s"), msg
    assert "parallel.timeout_s" in msg
    # gloo gives up once the 2 s have passed, not before, and promptly (25.007 s measured with
    # timeout_s=25 on a machine loaded 6x); the upper bound leaves a loaded machine room to
    # schedule the wake-up late, while the 600 s default a lost setting falls back to fails.
    assert 2.0 <= waited < 10, waited


# -- stability tools (one process) -----------------------------------------------------------


def test_nan_loss_skips_the_step_and_too_many_in_a_row_stop_the_run(tmp_path, small_shards):
    t = Trainer(
        small_job(
            tmp_path / "run", small_shards, "train.max_steps=10", "train.max_nonfinite_steps=3"
        )
    )
    bad_steps = {3, 6, 7, 8, 9}

    def poison(module, args, out):
        return out * float("nan") if t.step in bad_steps else out

    t.model.final_layer_norm.register_forward_hook(poison)
    weights_at: dict[int, dict] = {}

    def snapshot(module, args, out):
        if t.step in (3, 4):
            weights_at[t.step] = {k: v.clone() for k, v in t.model.state_dict().items()}

    t.model.embed_tokens.register_forward_hook(snapshot)
    with pytest.raises(NonFiniteLoss, match="3 steps in a row"):
        t.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["nonfinite_skips"] for r in rows] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert math.isnan(rows[2]["loss"]) and rows[2]["skipped"]
    assert math.isfinite(rows[3]["loss"]) and not rows[3]["skipped"]
    # The skipped step 3 left the weights as they were; no NaN ever reached them.
    for k, v in weights_at[3].items():
        assert torch.equal(v, weights_at[4][k]), k
    assert all(torch.isfinite(v).all() for v in t.model.state_dict().values())


def test_skip_steps_replays_past_bad_batches_the_same_at_any_world_size(small_shards):
    windows = PackedWindows(small_shards, "train", 32)

    def global_batches(world: int, skip) -> list[list[int]]:
        loaders = [
            GlobalOrderLoader(windows, 0, 8, 2, r, world, skip_steps=skip) for r in range(world)
        ]
        out = []
        for _ in range(4):
            rows = [torch.cat([x for x, _ in ld.next_step()]) for ld in loaders]
            out.append(torch.cat(rows).tolist())
        return out

    plain = [GlobalOrderLoader(windows, 0, 8, 2)]
    original = []
    for _ in range(7):
        original.append(torch.cat([x for x, _ in plain[0].next_step()]).tolist())
    skipped = global_batches(1, [(2, 3), (5, 5)])
    # Steps 2-3 and 5 of the original order are never seen: 1, 4, 6, 7.
    assert skipped == [original[0], original[3], original[5], original[6]]
    assert global_batches(2, [(2, 3), (5, 5)]) == skipped
    assert global_batches(4, [(2, 3), (5, 5)]) == skipped


def test_final_activation_rms_is_logged_at_its_interval(tmp_path, small_shards):
    run = tmp_path / "run"
    Trainer(
        small_job(run, small_shards, "train.max_steps=4", "logging.activation_norm_interval=2")
    ).fit()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "event" not in r]  # the goodput ledger's closing row
    assert ["act_rms" in r for r in rows] == [False, True, False, True]
    # After the final LayerNorm (unit weight, zero bias at init) the RMS is close to 1.
    assert 0.5 < rows[1]["act_rms"] < 2.0
