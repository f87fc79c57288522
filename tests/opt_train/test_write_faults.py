"""Write faults and a second run on one run_dir, on real filesystems with real processes.

The faults are the kernel's own: a small tmpfs as run_dir (full: ENOSPC; remounted read-only:
EROFS), a btrfs loop image with a qgroup limit (EDQUOT), a directory or a link to /dev/full
where a file is written (EISDIR, ENOSPC). Mounting needs root (CI runs as root); a test that
cannot mount fails with the reason instead of skipping, and every mount is unmounted even when
the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opt_train.checkpoint.manager import EXIT_CHECKPOINT_FAILED
from opt_train.train.callbacks.metrics_file import _drop_rows_after
from opt_train.train.run_files import JsonlAppender, write_text_atomic
from opt_train.train.run_lock import EXIT_RUN_DIR_LOCKED, RunDirLocked, RunLock
from tests.multirank import REPO, rank_env, torchrun_cmd
from tests.opt_train.conftest import train_on_ranks
from tests.opt_train.test_fault_tolerance import TINY, popen, wait_for
from tests.processes import kill_tree
from tests.processes import run as run_to_end


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of `size` bytes at `path`, unmounted on the way out whatever happened."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs at {path} (these tests need root, as CI runs them): "
            f"{r.stderr.strip()} (uid {os.getuid()})"
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # busy: detach it


@contextlib.contextmanager
def btrfs_with_quota(path: Path, image: Path):
    """A btrfs (a sparse loop image) at `path` with quotas on, and the subvolume
    `path/quota`, which `quota_limit` limits (writes past it fail with EDQUOT, for root too);
    unmounted on the way out. Needs btrfs-progs (.ci/run installs it)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(256 * 2**20)  # sparse; btrfs wants ~110 MiB at least
    steps = [
        ["mkfs.btrfs", "-q", str(image)],
        ["mount", "-o", "loop", str(image), str(path)],
        ["btrfs", "quota", "enable", str(path)],
        ["btrfs", "subvolume", "create", str(path / "quota")],
    ]
    mounted = False
    try:
        for cmd in steps:
            try:
                r = subprocess.run(cmd, capture_output=True, text=True)
            except FileNotFoundError:
                pytest.fail(
                    f"{cmd[0]} not found: this test needs btrfs-progs (.ci/run installs it)"
                )
            if r.returncode != 0:
                pytest.fail(f"{' '.join(cmd)} failed (root and loop devices needed): {r.stderr}")
            mounted = mounted or cmd[0] == "mount"
        yield path / "quota"
    finally:
        if mounted and subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)
        image.unlink(missing_ok=True)


def quota_limit(subvolume: Path, limit: int | None) -> None:
    """Limit `subvolume` (of `btrfs_with_quota`) to `limit` bytes (None: no limit). Asked
    through the filesystem's top level: asked through the subvolume itself, the change needs
    room in it and fails with EDQUOT once it is over its limit."""
    cmd = ["btrfs", "inspect-internal", "rootid", str(subvolume)]
    qgroup = "0/" + subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    cmd = ["btrfs", "qgroup", "limit", "none" if limit is None else str(limit), qgroup]
    r = subprocess.run([*cmd, str(subvolume.parent)], capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    got: dict[int, float] = {}
    for r in rows(run_dir):
        if "loss" in r:
            assert r["step"] not in got, f"step {r['step']} logged twice"
            got[r["step"]] = r["loss"]
    return got


def overrides(run_dir: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.path={data}", *TINY, f"train.max_steps={steps}", *extra]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run_to_end(cmd, timeout, cwd=REPO, env=rank_env())


@pytest.mark.slow
@pytest.mark.multirank
def test_disk_full_run_goes_on_stops_after_max_failures_and_its_checkpoint_resumes_bit_exact(
    tmp_path, small_shards
):
    steps = 12
    every2 = ["checkpoint.interval=2", "checkpoint.max_failures=3"]
    ref = tmp_path / "reference"
    train_on_ranks(2, overrides(ref, small_shards, steps, *every2))  # numbers only: no torchrun
    reference = step_losses(ref)
    assert sorted(reference) == list(range(1, steps + 1))
    size = sum(f.stat().st_size for f in (ref / "checkpoints" / "step_00000012").rglob("*"))

    # One checkpoint fits, two do not: the first save (step 2) works, later ones fail.
    with tmpfs(tmp_path / "small", int(1.5 * size)) as small:
        full = small / "run"
        r = run(torchrun_cmd(2, overrides(full, small_shards, steps, *every2)))
        log = r.stderr
        assert r.returncode != 0, log[-4000:]  # torchrun exits 1 when a worker fails
        assert log.count(f"exitcode  : {EXIT_CHECKPOINT_FAILED}") >= 1, log[-4000:]
        assert "3 checkpoint saves in a row failed (checkpoint.max_failures=3)" in log, log[-4000:]
        assert "newest complete checkpoint: step_00000002" in log
        lines = [x for x in log.splitlines() if " failed (" in x and "checkpoint step_" in x]
        assert len(lines) == 3 and all("OSError [Errno 28]" in x for x in lines), lines
        assert "needs about" in log  # said before writing, from step_2's size
        ckpts = full / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]
        failed = [x for x in rows(full) if x.get("event") == "checkpoint_failed"]
        assert [x["step"] for x in failed] == [4, 6, 8]
        assert [x["latest_complete"] for x in failed] == ["step_00000002"] * 3
        # Every failed save names the rank and its OS error, wherever the disk filled (before
        # DCP, in a DCP writer thread, inside torch.save's zip writer, in DCP's .metadata).
        assert all(x["error"].startswith("rank ") for x in failed), [x["error"] for x in failed]
        assert all("OSError [Errno 28]" in x["error"] for x in failed), [x["error"] for x in failed]
        got = step_losses(full)  # every step once; went on past the failed saves
        assert min(got) == 1 and sorted(got) == list(range(1, max(got) + 1)) and max(got) >= 8
        assert {s: got[s] for s in got} == {s: reference[s] for s in got}
        moved = tmp_path / "moved"
        (moved / "checkpoints").mkdir(parents=True)
        shutil.copytree(ckpts / "step_00000002", moved / "checkpoints" / "step_00000002")

    # The newest complete checkpoint, on a disk with room, continues the uninterrupted run.
    resumed = "resumed from " + str(moved / "checkpoints" / "step_00000002")
    train_on_ranks(2, overrides(moved, small_shards, steps, *every2), says=(resumed,))
    resumed = step_losses(moved)
    assert sorted(resumed) == list(range(3, steps + 1))
    assert resumed == {s: reference[s] for s in range(3, steps + 1)}  # bit for bit


def train_cmd(run_dir: Path, data: Path, steps: int) -> list[str]:
    return [sys.executable, "train.py", *overrides(run_dir, data, steps)]


@pytest.mark.slow
def test_a_second_run_on_the_same_run_dir_is_refused_and_the_first_logs_every_step_once(
    tmp_path, small_shards
):
    run_dir = tmp_path / "run"
    with popen(train_cmd(run_dir, small_shards, 100000), tmp_path / "first.log") as first:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), first)
        t0 = time.monotonic()
        second = run(train_cmd(run_dir, small_shards, 100000), timeout=120)
        took = time.monotonic() - t0
        assert second.returncode == EXIT_RUN_DIR_LOCKED, second.stderr[-3000:]
        assert f"is in use by another run (pid {first.pid} on " in second.stderr
        assert first.poll() is None, "the first run must still be training"
        # Seconds: Python and torch start-up, then the refusal, before any model is built.
        assert "parameters" not in second.stderr and took < 60
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 85
    got = step_losses(run_dir)
    assert sorted(got) == list(range(1, max(got) + 1))
    assert (run_dir / "run.lock").read_text() == ""  # released on the way out


@pytest.mark.slow
def test_a_lock_left_by_a_sigkilled_run_is_taken_over_by_the_next_start(tmp_path, small_shards):
    run_dir = tmp_path / "run"
    with popen(train_cmd(run_dir, small_shards, 100000), tmp_path / "first.log") as first:
        wait_for(lambda: (run_dir / "checkpoints" / "step_00000003").is_dir(), first)
        kill_tree(first.pid)
        first.wait()
    held = json.loads((run_dir / "run.lock").read_text())
    assert held["pid"] == first.pid
    killed_at = max(step_losses(run_dir))
    r = run(train_cmd(run_dir, small_shards, killed_at + 2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"taking over the lock of pid {first.pid} on " in r.stderr
    got = step_losses(run_dir)
    assert sorted(got) == list(range(1, killed_at + 3))


# -- one process, no training --------------------------------------------------------------


HOLD = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, sys.argv[2].encode())
print("held", flush=True)
time.sleep(600)
"""


def test_a_requeued_slurm_job_takes_over_its_earlier_attempts_lingering_lock(tmp_path, monkeypatch):
    """The kernel lock of a dead node can outlive it on NFS; an earlier attempt of the same
    Slurm job is dead by construction, so its lock is taken over. A live process holds the
    lock here in the place of the file server's lingering lock."""
    lock_file = tmp_path / "run.lock"
    record = {"host": "node-that-died", "pid": 4242, "slurm_job_id": "77", "slurm_restart_count": 0}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_file), json.dumps(record)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: refused, holder named
        with pytest.raises(RunDirLocked, match="pid 4242 on node-that-died, Slurm job 77"):
            RunLock(tmp_path).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued
        lock = RunLock(tmp_path).acquire()
        try:
            assert lock.took_over["pid"] == 4242 and not lock.locked
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        finally:
            lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_metrics_rows_are_whole_lines_on_a_full_disk_and_written_once_room_is_made(tmp_path):
    with tmpfs(tmp_path / "small", 64 * 1024) as small:
        path = small / "metrics.jsonl"
        config = small / "config.yaml"
        config.write_text("old: 1\n")
        out = JsonlAppender(path)
        assert out.append({"step": 1, "loss": 1.0})
        filler = small / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # fill the filesystem to the last byte
            while os.write(fd, b"x" * 512):
                pass
        os.close(fd)
        big = {"step": 2, "text": "y" * 20000}
        assert not out.append(big)  # fails: nothing of it reaches the file
        assert path.read_text() == '{"step": 1, "loss": 1.0}\n'
        assert isinstance(write_text_atomic(config, "z" * 20000), OSError)
        assert config.read_text() == "old: 1\n" and sorted(p.name for p in small.iterdir()) == [
            "config.yaml",
            "filler",
            "metrics.jsonl",
        ]
        filler.unlink()
        assert out.append({"step": 3, "loss": 3.0})
        out.close()
        got = [json.loads(x) for x in path.read_text().splitlines()]
        assert [r["step"] for r in got] == [1, 2, 2, 3]
        assert got[1]["event"] == "metrics_write_failed" and "Errno 28" in got[1]["error"]
        assert got[1]["rows_delayed"] == 2 and got[2] == big


def test_a_torn_last_line_and_rows_past_the_checkpoint_are_cut_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    _drop_rows_after(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"step": 2}')  # whole but for its newline: kept
    _drop_rows_after(path, 5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def _one_rank_fails(rank: int, world: int, root: str) -> None:
    """Rank 1 alone hits real OS errors: EISDIR (a directory where it writes a file) before
    DCP (its RNG file) and as DCP opens its first shard file; then ENOSPC from /dev/full (a
    shard file made a link to it) inside torch.save, in each of its four shard files in turn,
    sync and async, so also in DCP's writer threads, which write all but one of them and
    whose errors DCP drops (the save would return as if complete). Every rank must see the
    same failure, named by rank 1's own errno alone (not also under rank 0, which only heard
    of it from DCP), nothing may be published, and the next save works."""
    import torch
    from torch.distributed.fsdp import fully_shard

    from opt_train.checkpoint.manager import CheckpointManager
    from opt_train.checkpoint.weights import DCPWeights
    from opt_train.config import CheckpointConfig
    from opt_train.parallel.process_groups import DistInfo

    model = fully_shard(torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 128)))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 128)).sum().backward()
    opt.step()
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    ckpts = Path(root) / "checkpoints"
    cfg = CheckpointConfig(async_save=True, max_failures=0)  # six failures in a row: go on
    mgr = CheckpointManager(ckpts, cfg, info, timeout_s=60)
    weights = DCPWeights(model, opt, write_threads=4)
    eisdir = "rank 1: OSError [Errno 21] Is a directory"
    enospc = "rank 1: OSError [Errno 28] No space left on device"
    saves = [
        (1, "rng/rank_00001.json", "dir", True, eisdir),
        (2, "__1_0.distcp", "dir", False, eisdir),
        *[(3 + n, f"__1_{n}.distcp", "/dev/full", n % 2 == 0, enospc) for n in range(4)],
        (7, None, None, False, None),
    ]
    for step, trap, kind, blocking, expected in saves:
        if rank == 1 and trap:
            at = ckpts / f".tmp-step_{step:08d}" / trap
            at.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dir":
                at.mkdir()
            else:
                at.symlink_to(kind)
        torch.distributed.barrier()
        mgr.save(step, weights, {"step": step}, "x: 1\n", blocking=blocking)
        mgr.wait()
        failed = mgr.poll()
        if trap:
            assert [f.step for f in failed] == [step], (rank, step, failed)
            assert failed[0].errors == expected, (step, failed[0].errors)
            assert failed[0].in_a_row == step and mgr.last_saved_step == -1
        else:
            assert failed == [] and mgr.last_saved_step == step, (rank, failed)
        torch.distributed.barrier()
        names = sorted(p.name for p in ckpts.iterdir())
        assert names == (["latest", "step_00000007"] if step == 7 else []), (step, names)
        if rank == 1 and step == 7:
            assert sorted(DCPWeights.files_of_rank(ckpts / names[1], 1)) == [
                f"__1_{n}.distcp" for n in range(4)
            ]  # the four files the traps were set in
        torch.distributed.barrier()  # before rank 1 sets the next trap
    assert Path("/dev/full").is_char_device()  # the links were removed, not followed


@pytest.mark.slow
@pytest.mark.multirank
def test_a_write_error_on_one_rank_fails_the_save_on_every_rank_and_the_next_one_works(tmp_path):
    from tests.multirank import spawn

    spawn(_one_rank_fails, 2, str(tmp_path))


def test_saves_fail_while_the_disk_is_full_and_work_again_once_room_is_made(tmp_path, small_shards):
    """In one process, async saves: a file fills the run_dir's filesystem from step 3 to 6
    and is removed before step 7; the saves of steps 4 and 6 fail (two in a row, below
    max_failures), the final one at 8 works, and every step's row is there once."""
    from opt_train.train.callbacks.base import Callback
    from opt_train.train.trainer import Trainer
    from tests.opt_train.conftest import small_job

    class Filler(Callback):
        def pre_step(self, trainer):
            filler = trainer.run_dir / "filler"
            if trainer.step == 3:
                trainer.ckpt.wait()  # the async save of step 2 is on disk first
                fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
                with contextlib.suppress(OSError):
                    while os.write(fd, b"x" * 4096):
                        pass
                os.close(fd)
            elif trainer.step == 7:
                filler.unlink()

    with tmpfs(tmp_path / "small", 16 * 2**20) as small:
        run_dir = small / "run"
        cfg = small_job(run_dir, small_shards, "train.max_steps=8", "checkpoint.interval=2")
        t = Trainer(cfg, callbacks=[Filler()])
        t.fit()
        t.close()
        got = rows(run_dir)
        failed = [r for r in got if r.get("event") == "checkpoint_failed"]
        assert [(r["step"], r["failures_in_a_row"]) for r in failed] == [(4, 1), (6, 2)]
        # (rows may still fit the page metrics.jsonl already has; the unit test above fills it)
        assert sorted(step_losses(run_dir)) == list(range(1, 9))
        names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert names == ["latest", "step_00000002", "step_00000008"]
        assert t.ckpt.last_saved_step == 8 and not t.ckpt.gave_up


def test_saves_fail_while_the_checkpoint_filesystem_is_read_only_and_work_once_it_is_not(
    tmp_path, small_shards
):
    """In one process, async saves: the tmpfs holding checkpoints/ is remounted read-only
    from step 3 to 6 (EROFS, as after a storage error or an administrator's remount); the
    saves of steps 4 and 6 fail naming it, training goes on, and step 8's save works."""
    from opt_train.train.callbacks.base import Callback
    from opt_train.train.trainer import Trainer
    from tests.opt_train.conftest import small_job

    def remount(path: Path, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)

    class ReadOnly(Callback):
        def pre_step(self, trainer):
            if trainer.step == 3:
                trainer.ckpt.wait()  # no file open for writing: the kernel refuses ro (EBUSY)
                remount(trainer.ckpt.dir, "ro")
            elif trainer.step == 7:
                remount(trainer.ckpt.dir, "rw")

    run_dir = tmp_path / "run"
    with tmpfs(run_dir / "checkpoints", 64 * 2**20):
        cfg = small_job(run_dir, small_shards, "train.max_steps=8", "checkpoint.interval=2")
        t = Trainer(cfg, callbacks=[ReadOnly()])
        t.fit()
        t.close()
        failed = [r for r in rows(run_dir) if r.get("event") == "checkpoint_failed"]
        assert [(r["step"], r["failures_in_a_row"]) for r in failed] == [(4, 1), (6, 2)]
        assert all(
            r["error"] == "rank 0: OSError [Errno 30] Read-only file system" for r in failed
        ), [r["error"] for r in failed]
        assert sorted(step_losses(run_dir)) == list(range(1, 9))
        names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert names == ["latest", "step_00000002", "step_00000008"]
        assert t.ckpt.last_saved_step == 8 and not t.ckpt.gave_up


def test_saves_fail_while_the_run_dir_is_over_its_disk_quota_and_work_once_it_is_raised(
    tmp_path, small_shards
):
    """In one process, async saves, with run_dir on a btrfs subvolume: at step 3 its qgroup
    limit is lowered below what it holds (step 2's checkpoint is ~1.5 MiB), so the saves of
    steps 4 and 6 fail naming EDQUOT and training goes on (metrics rows that cannot be
    written wait in memory); the limit goes at step 7 and step 8's save works. (A limit just
    above the usage would not do: btrfs counts freed space late and metadata too, so how
    much fits would vary.)"""
    from opt_train.train.callbacks.base import Callback
    from opt_train.train.trainer import Trainer
    from tests.opt_train.conftest import small_job

    class Quota(Callback):
        def pre_step(self, trainer):
            if trainer.step == 3:
                trainer.ckpt.wait()  # step 2's checkpoint is written first
                quota_limit(trainer.run_dir.parent, 2**16)
            elif trainer.step == 7:
                quota_limit(trainer.run_dir.parent, None)

    with btrfs_with_quota(tmp_path / "btrfs", tmp_path / "btrfs.img") as quota:
        run_dir = quota / "run"
        cfg = small_job(run_dir, small_shards, "train.max_steps=8", "checkpoint.interval=2")
        t = Trainer(cfg, callbacks=[Quota()])
        t.fit()
        t.close()
        failed = [r for r in rows(run_dir) if r.get("event") == "checkpoint_failed"]
        assert [(r["step"], r["failures_in_a_row"]) for r in failed] == [(4, 1), (6, 2)]
        assert all(
            r["error"] == "rank 0: OSError [Errno 122] Disk quota exceeded" for r in failed
        ), [r["error"] for r in failed]
        delayed = [r for r in rows(run_dir) if r.get("event") == "metrics_write_failed"]
        assert [r["error"] for r in delayed] == ["OSError [Errno 122] Disk quota exceeded"]
        assert sorted(step_losses(run_dir)) == list(range(1, 9))
        names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert names == ["latest", "step_00000002", "step_00000008"]
        assert t.ckpt.last_saved_step == 8 and not t.ckpt.gave_up
