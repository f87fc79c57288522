"""The checkpoint format: self-describing, verified, pruned as configured (one process)."""

import dataclasses
import json
import logging

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from data_pipeline.files import sha256_file
from opt_train.checkpoint.layout import verify
from opt_train.checkpoint.manager import CheckpointManager
from opt_train.checkpoint.trusted import CorruptCheckpoint
from opt_train.config import CheckpointConfig
from opt_train.train.trainer import Trainer
from tests.opt_train.conftest import small_job


def test_checkpoint_lists_every_file_with_size_and_checksum_and_stores_only_tensors_in_dcp(
    tmp_path, small_shards
):
    run = tmp_path / "run"
    Trainer(small_job(run, small_shards, "train.max_steps=2", "checkpoint.interval=2")).fit()
    ckpt = run / "checkpoints" / "step_00000002"
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    meta = json.loads((ckpt / "meta.json").read_text())
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {"meta.json"}
    assert set(meta["files"]) == on_disk
    assert {".metadata", "state.json", "config.yaml", "rng/rank_00000.json"} <= on_disk
    assert meta["step"] == 2 and meta["world"] == 1
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["tokens"] == 2 * 256
    assert state["data"]["samples_seen"] == 2 * 8
    # Every DCP entry is a tensor (no pickled Python objects besides DCP's own index), and
    # the optimizer moments are there, not just the weights.
    entries = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert all(isinstance(m, TensorStorageMetadata) for m in entries.values())
    assert any(k.endswith("exp_avg_sq") for k in entries)
    assert "model.embed_tokens.weight" in entries


def test_truncated_flipped_or_unfinished_checkpoints_are_reported_and_skipped(
    tmp_path, small_shards, caplog
):
    run = tmp_path / "run"
    job = ["train.max_steps=6", "checkpoint.interval=2", "checkpoint.keep=3"]
    Trainer(small_job(run, small_shards, *job)).fit()
    ckpts = run / "checkpoints"
    with open(ckpts / "step_00000006" / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)  # a copy that stopped half way
    with open(ckpts / "step_00000004" / "state.json", "r+b") as f:
        f.seek(2)
        f.write(b"9")  # same size, other bytes
    manager = CheckpointManager(ckpts, CheckpointConfig(), None)
    with caplog.at_level(logging.WARNING, logger="opt_train.checkpoint.manager"):
        assert manager.latest() == ckpts / "step_00000002"
    log = caplog.text
    assert "step_00000006/__0_0.distcp" in log and "truncated" in log
    assert "step_00000004/state.json" in log and "checksum mismatch" in log
    (ckpts / "step_00000002" / "meta.json").unlink()
    assert manager.latest() is None
    # The trainer starts over rather than loading damaged state.
    assert Trainer(small_job(run, small_shards, *job)).step == 0


def test_keep_the_last_k_plus_every_nth_for_good(tmp_path, small_shards):
    run = tmp_path / "run"
    cfg = ["train.max_steps=7", "checkpoint.interval=1", "checkpoint.keep=2"]
    Trainer(small_job(run, small_shards, *cfg, "checkpoint.keep_every=3")).fit()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000003", "step_00000006", "step_00000007"]
    for name in kept:
        verify(run / "checkpoints" / name)


def test_sync_and_async_saves_write_identical_bytes(tmp_path, small_shards):
    for mode in ("true", "false"):
        Trainer(
            small_job(
                tmp_path / mode, small_shards, "train.max_steps=2", f"checkpoint.async_save={mode}"
            )
        ).fit()
    a, b = (
        json.loads((tmp_path / m / "checkpoints/step_00000002/meta.json").read_text())["files"]
        for m in ("true", "false")
    )
    # DCP's .metadata is a pickled index whose storage_meta holds the save's own temporary
    # directory and a fresh uuid4 save_id and load_id, so its bytes differ between any two saves
    # (here 36783 against 36784 bytes: "true" and "false" in the path). Everything else in it,
    # which tensor lives in which file at which offset and size, must match.
    ma, mb = (
        dcp.FileSystemReader(str(tmp_path / m / "checkpoints/step_00000002")).read_metadata()
        for m in ("true", "false")
    )
    assert ma.storage_meta.save_id != mb.storage_meta.save_id  # why the bytes cannot match
    assert dataclasses.replace(ma, storage_meta=None) == dataclasses.replace(mb, storage_meta=None)
    # config.yaml differs (it names the mode); weights, optimizer, state and RNG must not. The
    # trainer state's goodput ledger holds each run's own wall-clock seconds, so state.json is
    # compared without it.
    states = [
        json.loads((tmp_path / m / "checkpoints/step_00000002/state.json").read_text())
        for m in ("true", "false")
    ]
    assert "goodput" in states[0] and "goodput" in states[1]
    assert {**states[0], "goodput": None} == {**states[1], "goodput": None}
    for name in ("config.yaml", ".metadata", "state.json"):
        del a[name], b[name]
    assert {k: v["xxh3_128"] for k, v in a.items()} == {k: v["xxh3_128"] for k, v in b.items()}


def test_checkpoints_with_sha256_checksums_from_before_still_verify(tmp_path, small_shards):
    run = tmp_path / "run"
    Trainer(small_job(run, small_shards, "train.max_steps=2", "checkpoint.interval=2")).fit()
    ckpt = run / "checkpoints" / "step_00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert all(set(f) == {"bytes", "xxh3_128"} for f in meta["files"].values())
    meta["files"] = {
        name: {"bytes": f["bytes"], "sha256": sha256_file(ckpt / name)}
        for name, f in meta["files"].items()
    }
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert verify(ckpt)["step"] == 2
    with open(ckpt / "state.json", "r+b") as f:
        f.seek(2)
        f.write(b"9")
    with pytest.raises(CorruptCheckpoint, match="sha256 checksum mismatch"):
        verify(ckpt)


def test_export_reads_only_a_checkpoint_that_verifies(tmp_path, small_shards):
    """Named directly or found in a run_dir, the checkpoint an export reads is verified; a
    damaged one is refused (named) or, in a run_dir, passed over for the previous one."""
    from opt_train.checkpoint.layout import find_checkpoint

    run = tmp_path / "run"
    job = ["train.max_steps=4", "checkpoint.interval=2", "checkpoint.keep=2"]
    Trainer(small_job(run, small_shards, *job)).fit()
    newest = run / "checkpoints" / "step_00000004"
    with open(newest / "__0_0.distcp", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpoint, match="__0_0.distcp: xxh3_128 checksum mismatch"):
        find_checkpoint(newest)
    assert find_checkpoint(run) == run / "checkpoints" / "step_00000002"
