"""What a checkpoint and a run_dir may make this project do: load no code, lose no user data,
change nothing when only read, and survive damaged run files. Real checkpoints written by the
real trainer, real DCP files, real subprocesses."""

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from opt_train.checkpoint.layout import _checksum, find_checkpoint
from opt_train.checkpoint.manager import CheckpointManager, CheckpointSaveFailed
from opt_train.checkpoint.trusted import CorruptCheckpoint, load_dcp, read_dcp_metadata
from opt_train.config import CheckpointConfig
from opt_train.tools import hf_export as hf
from opt_train.tools import plot
from opt_train.train.trainer import Trainer
from tests.opt_train.conftest import REPO, small_job, small_job_overrides

STEP = "step_{:08d}".format


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_shards) -> Path:
    """A finished run with complete checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("trained") / "run"
    job = ["train.max_steps=4", "checkpoint.interval=2", "checkpoint.keep=5"]
    t = Trainer(small_job(run, small_shards, *job))
    t.fit()
    t.close()
    return run


@pytest.fixture
def run(tmp_path, trained) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its type, size, mtime and (files) content digest."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


class Payload:
    """Unpickling this runs `touch <marker>`: what a hostile `.metadata` would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle_payload(ckpt: Path, marker: Path) -> None:
    """Replace DCP's `.metadata` with a payload and recompute meta.json's record of it, as
    anyone who can write the run_dir can: the checksums then match."""
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][".metadata"] = {
        "bytes": (ckpt / ".metadata").stat().st_size,
        "xxh3_128": _checksum(ckpt / ".metadata"),
    }
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_the_planted_payload_is_live_for_plain_pickle(tmp_path, run):
    """The attack is real: DCP's own reader (pickle.load) runs it. A subprocess, so the
    payload runs there."""
    marker = tmp_path / "ran-under-plain-dcp"
    plant_pickle_payload(run / "checkpoints" / STEP(4), marker)
    code = (
        "import sys, torch.distributed.checkpoint as dcp; "
        "dcp.FileSystemReader(sys.argv[1]).read_metadata()"
    )
    subprocess.run([sys.executable, "-c", code, str(run / "checkpoints" / STEP(4))], cwd=REPO)
    assert marker.exists()


def test_a_pickle_payload_in_metadata_is_refused_on_resume_which_falls_back(
    tmp_path, run, small_shards, caplog
):
    marker = tmp_path / "payload-ran"
    plant_pickle_payload(run / "checkpoints" / STEP(4), marker)
    with pytest.raises(CorruptCheckpoint, match=r"names posix\.system"):
        read_dcp_metadata(run / "checkpoints" / STEP(4))
    job = ["train.max_steps=5", "checkpoint.interval=100", "checkpoint.keep=5"]
    with caplog.at_level(logging.WARNING, logger="opt_train.checkpoint.manager"):
        t = Trainer(small_job(run, small_shards, *job))
    try:
        assert t.resumed_from == str(run / "checkpoints" / STEP(2))
        assert t.step == 2
        assert f"skipping damaged checkpoint {run / 'checkpoints' / STEP(4)}" in caplog.text
        assert "which a DCP index never holds" in caplog.text
        t.fit()
    finally:
        t.close()
    assert not marker.exists()


def test_a_pickle_payload_in_metadata_is_refused_on_export(tmp_path, run, capsys):
    marker = tmp_path / "payload-ran"
    plant_pickle_payload(run / "checkpoints" / STEP(4), marker)
    # Named directly: refused, one line.
    with pytest.raises(SystemExit, match=r"error: .*step_00000004/\.metadata: not a DCP index"):
        hf.main([str(run / "checkpoints" / STEP(4)), str(tmp_path / "hf4")])
    assert not (tmp_path / "hf4").exists()
    # Through the run_dir: the previous good checkpoint is exported.
    hf.main([str(run), str(tmp_path / "hf")])
    record = json.loads((tmp_path / "hf" / hf.EXPORT_RECORD).read_text())
    assert record["checkpoint"] == STEP(2) and record["step"] == 2
    assert not marker.exists()


def test_dcp_bytes_entries_are_refused_before_dcp_would_torch_load_them(tmp_path):
    """A DCP checkpoint whose non-tensor entry is a pickle: DCP's default planner
    `torch.load(weights_only=False)`s it (shown), `load_dcp` refuses it and runs nothing."""
    ckpt = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(3), "evil": Payload(tmp_path / "under-dcp")}, checkpoint_id=ckpt,
             no_dist=True)  # fmt: skip
    assert not (tmp_path / "under-dcp").exists()
    dcp.load({"w": torch.zeros(3), "evil": io.BytesIO()}, checkpoint_id=ckpt, no_dist=True)
    assert (tmp_path / "under-dcp").exists()  # the hazard the project's loader closes

    (tmp_path / "under-dcp").unlink()
    with pytest.raises(CorruptCheckpoint, match=r"1 non-tensor entries \(evil\)"):
        load_dcp({"w": torch.zeros(3), "evil": io.BytesIO()}, ckpt)
    with pytest.raises(CorruptCheckpoint, match="non-tensor entries"):
        load_dcp({"w": torch.zeros(3)}, ckpt)
    assert not (tmp_path / "under-dcp").exists()


@pytest.mark.slow
def test_export_during_a_live_async_save_leaves_the_save_intact(tmp_path, small_shards):
    run = tmp_path / "run"
    gate = tmp_path / "gate"  # the save of step 4 stays in flight, as .tmp-step_4, until released
    gate.mkdir()
    (gate / STEP(2)).touch()
    job = [
        "train.max_steps=4",
        "checkpoint.interval=2",
        "checkpoint.async_save=true",
        f"checkpoint.debug_gate={gate}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *small_job_overrides(run, small_shards, *job)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ckpts = run / "checkpoints"
    in_flight = ckpts / f".tmp-{STEP(4)}"
    try:
        deadline = time.monotonic() + 300
        while not ((ckpts / STEP(2)).is_dir() and (in_flight / ".metadata").is_file()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        before = snapshot(in_flight)
        for attempt in range(3):  # three exports in a row stopped the run before (exit 86)
            done = hf.export_checkpoint(run, tmp_path / "hf")
            assert done["step"] == 2
            assert in_flight.is_dir() and not (ckpts / STEP(4)).exists(), attempt
        assert snapshot(in_flight) == before
    finally:
        (gate / STEP(4)).touch()
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "checkpoint_failed" not in (run / "metrics.jsonl").read_text()
    assert find_checkpoint(run) == ckpts / STEP(4)  # complete and verified
    assert hf.export_checkpoint(run, tmp_path / "hf")["step"] == 4  # and loadable


def test_export_refuses_a_directory_that_is_not_its_own_and_touches_nothing(tmp_path, run):
    users = tmp_path / "my-model"
    users.mkdir()
    (users / "config.json").write_text('{"model_type": "opt"}')
    (users / "pytorch_model.bin").write_bytes(b"\x00" * 1000)
    (users / "notes").mkdir()
    before = snapshot(users)
    with pytest.raises(SystemExit) as refused:
        hf.main([str(run), str(users)])
    line = str(refused.value)
    assert "\n" not in line and str(users) in line and "is not an opt-train export" in line
    assert "3 entries: config.json, notes/, pytorch_model.bin" in line
    assert snapshot(users) == before

    # A link to our own export is refused as well: replacing it would go through the link.
    ours = tmp_path / "ours"
    hf.main([str(run), str(ours)])
    (tmp_path / "link").symlink_to(ours)
    before = snapshot(ours)
    with pytest.raises(SystemExit, match="holds a symbolic link to"):
        hf.main([str(run), str(tmp_path / "link")])
    assert snapshot(ours) == before and (tmp_path / "link").is_symlink()

    # Our own export is replaced by a re-export, and its record names the run and step.
    (ours / "config.json").write_text("stale")
    hf.main([str(run), str(ours)])
    record = json.loads((ours / hf.EXPORT_RECORD).read_text())
    assert record == {
        "kind": hf.EXPORT_KIND,
        "run_dir": str(run.resolve()),
        "checkpoint": STEP(4),
        "step": 4,
    }
    assert json.loads((ours / "config.json").read_text())["model_type"] == "opt"


def test_tools_that_read_a_run_dir_change_nothing_in_it(tmp_path, run, capsys):
    """Export and plot leave every path, size and mtime under the run_dir as it was, including
    another save's temporaries, which only the process holding the run lock may clear."""
    leftover = run / "checkpoints" / f".tmp-{STEP(6)}"
    shutil.copytree(run / "checkpoints" / STEP(4), leftover)
    before = snapshot(run)
    hf.main([str(run), str(tmp_path / "hf")])
    hf.main([str(run / "checkpoints"), str(tmp_path / "hf")])
    plot.main([str(run), "-o", str(tmp_path / "curves.png")])
    assert find_checkpoint(run) == run / "checkpoints" / STEP(4)
    assert snapshot(run) == before
    # A manager in a process without the run lock (a tool) clears nothing either.
    CheckpointManager(run / "checkpoints", CheckpointConfig(), None)
    assert leftover.is_dir() and snapshot(run) == before


def test_malformed_metrics_rows_and_meta_fields_are_skipped_and_resume_works(
    tmp_path, run, small_shards, caplog, capsys
):
    metrics = run / "metrics.jsonl"
    rows = metrics.read_text().splitlines(keepends=True)
    bad = ['{"step": "3", "loss": 1.0}\n', "not json at all\n", "[1, 2]\n"]
    metrics.write_text("".join(rows[:2] + bad + rows[2:]))
    meta_path = run / "checkpoints" / STEP(4) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["world"] = "1"  # a string where an int belongs
    meta_path.write_text(json.dumps(meta))

    with pytest.raises(CorruptCheckpoint, match=r"meta.json: 'world' is '1', expected int"):
        find_checkpoint(run / "checkpoints" / STEP(4))
    plot.main([str(run), "-o", str(tmp_path / "curves")])  # no suffix: PNG
    err = capsys.readouterr().err
    assert f"{metrics}:3: not a metrics row" in err and f"{metrics}:4:" in err
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match=r"cannot write '\.nope' images; use one of .*\.png"):
        plot.main([str(run), "-o", str(tmp_path / "curves.nope")])

    job = ["train.max_steps=5", "checkpoint.interval=100", "checkpoint.keep=5"]
    with caplog.at_level(logging.WARNING):
        t = Trainer(small_job(run, small_shards, *job))
        try:
            assert t.resumed_from == str(run / "checkpoints" / STEP(2))
            t.fit()
        finally:
            t.close()
    assert "'world' is '1', expected int" in caplog.text
    assert "a row with step '3', not an integer: kept" in caplog.text
    kept = metrics.read_text().splitlines()
    assert '{"step": "3", "loss": 1.0}' in kept  # a row we did not write is not deleted
    assert [json.loads(x)["step"] for x in kept if x.startswith('{"step": ')][-3:] == [3, 4, 5]


def test_the_c10d_store_listens_on_every_interface_whatever_the_endpoint(tmp_path):
    """docs/slurm.md: a TCPStore asked for 127.0.0.1 still binds the wildcard address, so
    the rendezvous port is reachable from the network; keep clusters on a private network."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True)
    try:
        listening = {
            c.laddr.ip
            for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == store.port
        }
    finally:
        del store
    assert listening and listening <= {"::", "0.0.0.0"}


def test_a_rollback_target_skips_a_tampered_checkpoint_for_the_one_before(tmp_path, run):
    """Spike rollback picks its checkpoint with `latest(before=onset)`: the newest before the
    onset (step 4 for an onset at 5) carries a payload, so step 2 is taken and nothing runs."""
    marker = tmp_path / "payload-ran"
    plant_pickle_payload(run / "checkpoints" / STEP(4), marker)
    m = CheckpointManager(run / "checkpoints", CheckpointConfig(), None)
    assert m.latest(before=5) == run / "checkpoints" / STEP(2)
    assert m.latest(before=4) == run / "checkpoints" / STEP(2)
    assert m.latest(before=2) is None
    assert not marker.exists()


def test_a_debug_gate_never_released_fails_the_save_naming_the_gate(tmp_path, small_shards):
    """The test hook is bounded: a save held by `checkpoint.debug_gate` that the test never
    releases fails, naming the gate file, instead of hanging the run (here the end-of-run save,
    tried checkpoint.max_failures=3 times, stops the run)."""
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    job = [
        "train.max_steps=1",
        f"checkpoint.debug_gate={gate}",
        "checkpoint.debug_gate_timeout_s=0.5",
    ]
    trainer = Trainer(small_job(run, small_shards, *job))
    want = f"TimeoutError: checkpoint.debug_gate: {gate / STEP(1)} not created within 0.5 s"
    with pytest.raises(CheckpointSaveFailed, match=re.escape(want)):
        trainer.fit()
    assert not (run / "checkpoints" / STEP(1)).exists()
