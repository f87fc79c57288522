"""Checkpoints: atomic, self-describing directories under `run_dir/checkpoints/`.

    checkpoints/step_00000100/
        model.safetensors   weights (safetensors: loading runs no code)
        optimizer.pt        optimizer state, read back with torch.load(weights_only=True)
        rng.pt              torch RNG state
        state.json          trainer, schedule, loss scaler, data loader, python/numpy RNG
        config.yaml         the resolved job config
        meta.json           sha256 of every file above; written last
    checkpoints/latest      name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place only when
every file is on disk, then `latest` is replaced atomically. Loading verifies the checksums and
falls back to the previous checkpoint if the newest is damaged, so a kill at any instant of a
save leaves a loadable run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CorruptCheckpoint(RuntimeError):
    pass


class CheckpointManager:
    """Saves and restores whole-run state. Model and optimizer go through
    torch.distributed.checkpoint's state-dict API, which gathers FSDP/TP shards into plain
    tensors with canonical names (so a checkpoint loads on any mesh, or in one process); rank 0
    writes, every rank reads."""

    def __init__(self, directory: str | Path, keep: int, dist_info=None):
        self.dir = Path(directory)
        self.keep = keep
        self.rank = dist_info.rank if dist_info else 0
        self.world = dist_info.world if dist_info else 1

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}"

    def save(self, step: int, model, optimizer, state: dict, config_yaml: str) -> Path:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=opts)
        optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
        rng = _gather(torch.get_rng_state(), self.world)
        final = self.step_dir(step)
        if self.rank == 0:
            self._write(final, model_state, optim_state, rng, state, config_yaml)
        _barrier(self.world)
        return final

    def _write(self, final: Path, model_state, optim_state, rng, state, config_yaml) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model_state.items()},
            tmp / "model.safetensors",
        )
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save({"torch": rng}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        (tmp / "config.yaml").write_text(config_yaml)
        files = sorted(p.name for p in tmp.iterdir())
        meta = {"step": state["step"], "files": {f: _sha256(tmp / f) for f in files}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        for p in tmp.iterdir():
            _fsync(p)
        if final.exists():  # a re-save of the same step (e.g. after a restart) replaces it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.dir)
        latest_tmp = self.dir / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, self.dir / "latest")
        _fsync(self.dir)
        self._prune()

    def _prune(self) -> None:
        steps = self.complete_steps()
        for old in steps[: max(0, len(steps) - self.keep)]:
            shutil.rmtree(self.step_dir(old), ignore_errors=True)

    def complete_steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := STEP_DIR.match(p.name)))

    def verify(self, path: Path) -> dict:
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise CorruptCheckpoint(f"{path}: no meta.json (incomplete save)")
        meta = json.loads(meta_path.read_text())
        for name, digest in meta["files"].items():
            f = path / name
            if not f.is_file():
                raise CorruptCheckpoint(f"{f}: missing")
            if _sha256(f) != digest:
                raise CorruptCheckpoint(f"{f}: sha256 mismatch (corrupted)")
        return meta

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; damaged ones are reported and skipped. Rank 0
        decides and tells the others, so every rank resumes from the same one."""
        choice = None
        if self.rank == 0:
            for step in reversed(self.complete_steps()):
                path = self.step_dir(step)
                try:
                    self.verify(path)
                    choice = str(path)
                    break
                except (CorruptCheckpoint, json.JSONDecodeError, KeyError) as e:
                    log.warning("skipping damaged checkpoint %s: %s", path, e)
        choice = _broadcast(choice, self.world)
        return Path(choice) if choice else None

    def load(self, path: Path, model, optimizer) -> dict:
        """Restore model, optimizer and this rank's torch RNG; returns the trainer state."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_file(path / "model.safetensors"), options=opts)
        optim_state = torch.load(path / "optimizer.pt", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
        rng = torch.load(path / "rng.pt", weights_only=True)["torch"]
        if len(rng) == self.world:  # same world size: each rank continues its own stream
            torch.set_rng_state(rng[self.rank])
        return json.loads((path / "state.json").read_text())


def _gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    if world == 1:
        return [t]
    out: list = [None] * world
    dist.all_gather_object(out, t)
    return out


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def find_checkpoint(path: str | Path) -> Path:
    """A run_dir, a checkpoints/ dir or one checkpoint dir -> the checkpoint dir to read."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    for d in (p, p / "checkpoints"):
        if d.is_dir() and (found := CheckpointManager(d, keep=0).latest()):
            return found
    raise FileNotFoundError(f"{path}: no complete checkpoint found")


def load_model_for_export(path: str | Path):
    """(model, model_config) from a checkpoint, for HF export."""
    from omegaconf import OmegaConf

    from opt_train.config import JobConfig
    from opt_train.model import OPT

    ckpt_dir = find_checkpoint(path)
    CheckpointManager(ckpt_dir.parent, keep=0).verify(ckpt_dir)
    raw = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(ckpt_dir / "config.yaml"))
    cfg = OmegaConf.to_object(raw)
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = OPT(cfg.model)
    model.load_state_dict(load_file(ckpt_dir / "model.safetensors"), assign=True)
    return model, cfg.model
