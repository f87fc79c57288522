"""Checkpoint save and load: time, bytes and how long training is blocked, for an
OPT-125m-shaped model (fp32 weights + AdamW moments) at 1 and 2 gloo ranks, sync and async,
against the disk's own write bandwidth measured in the same run (`dd ... conv=fsync`).

Saves go through the real `CheckpointManager` (DCP shards, per-file xxh3-128 checksums, atomic publish),
so "save" is the time until the checkpoint is visible and verified-loadable; "blocked" is how
long the training thread waits (all of it when sync; the copy to CPU memory when async);
"load" is `latest()` (verifies every hash) plus `load()` into a freshly built model.

    python benchmarks/checkpoint.py [--dir /tmp] [--repeats 2] [--ranks 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The repository instead of this script's folder: benchmarks/tokenize.py would shadow the
# standard library's tokenize module.
sys.path[0] = str(REPO)


def disk_write_mib_s(directory: Path, mib: int = 512) -> float:
    """`dd` of zeros with fsync at the end: sequential write bandwidth to this filesystem."""
    target = directory / "dd.bin"
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    dt = time.perf_counter() - t0
    target.unlink()
    return mib / dt


def _build(world: int):
    """OPT-125m's shape (vocab 50272, 12 x 768) with AdamW moments initialised, sharded with
    FSDP2 over `world` ranks as the trainer does."""
    import torch

    from opt_train.config import ModelConfig, OptimConfig, ParallelConfig
    from opt_train.engine.optim import build_optimizer
    from opt_train.model.opt import OPT

    cfg = ModelConfig(name="opt-125m", n_layers=12, n_heads=12, d_model=768)
    torch.manual_seed(0)
    model = OPT(cfg)
    if world > 1:
        from opt_train.parallel.apply import parallelize
        from opt_train.parallel.dims import ParallelDims

        dims = ParallelDims.from_config(ParallelConfig(), world)
        mesh, _ = dims.build_mesh("cpu")
        parallelize(model, dims, mesh, "fp32", "off", False)
    opt = build_optimizer(model, OptimConfig())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates exp_avg / exp_avg_sq, as after the first training step
    opt.zero_grad(set_to_none=True)
    return model, opt


def _rank_main(rank: int, world: int, root: str, repeats: int, queue) -> None:
    """One rank (tests.multirank.spawn sets up its gloo group and one thread)."""
    import torch
    import torch.distributed as dist

    from opt_train.checkpoint.manager import CheckpointManager
    from opt_train.checkpoint.weights import DCPWeights
    from opt_train.config import CheckpointConfig
    from opt_train.parallel.process_groups import DistInfo

    info = DistInfo(rank, world, rank, torch.device("cpu"))
    model, opt = _build(world)
    rows = []
    for mode in ("sync", "async"):
        for rep in range(repeats):
            d = Path(root) / f"w{world}-{mode}-{rep}"
            mgr = CheckpointManager(d, CheckpointConfig(keep=1, async_save=mode == "async"), info)
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            mgr.save(1, DCPWeights(model, opt), {"step": 1, "tokens": 0}, "bench: true\n")
            blocked = time.perf_counter() - t0
            mgr.close()
            if world > 1:
                dist.barrier()
            saved = time.perf_counter() - t0
            model2, opt2 = _build(world)
            mgr2 = CheckpointManager(d, CheckpointConfig(), info)
            if world > 1:
                dist.barrier()
            t1 = time.perf_counter()
            path = mgr2.latest()
            mgr2.load(path, DCPWeights(model2, opt2))
            if world > 1:
                dist.barrier()
            loaded = time.perf_counter() - t1
            meta = json.loads((path / "meta.json").read_text())
            nbytes = sum(f["bytes"] for f in meta["files"].values())
            rows.append((mode, rep, blocked, saved, loaded, nbytes))
            mgr2.close()
            del model2, opt2
            if rank == 0:
                shutil.rmtree(d)
    if rank == 0:
        queue.put(rows)


def bench(world: int, root: Path, repeats: int) -> list[tuple]:
    import torch.multiprocessing as mp

    from tests.multirank import spawn

    queue = mp.get_context("spawn").SimpleQueue()
    spawn(_rank_main, world, str(root), repeats, queue)
    return queue.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="filesystem to write to")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ranks", default="1,2")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        # The disk is shared and its speed drifts: dd before, between and after the runs.
        dds = [disk_write_mib_s(root)]
        results = {}
        for w in map(int, args.ranks.split(",")):
            results[w] = bench(w, root, args.repeats)
            dds.append(disk_write_mib_s(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    dd = statistics.median(dds)
    print(
        "disk: dd bs=1M count=512 conv=fsync: "
        + ", ".join(f"{x:.0f}" for x in dds)
        + f" MiB/s (median {dd:.0f}; 'vs dd' divides by it)"
    )
    print(f"cores: {os.cpu_count()}; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(
        "| ranks | mode | bytes (MiB) | blocked (s) | save to visible (s) | save MiB/s | "
        "vs dd | load+verify (s) | load MiB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for world, rows in results.items():
        for mode in ("sync", "async"):
            mine = [r for r in rows if r[0] == mode]
            blocked = statistics.median(r[2] for r in mine)
            saved = statistics.median(r[3] for r in mine)
            loaded = statistics.median(r[4] for r in mine)
            mib = mine[0][5] / 2**20
            print(
                f"| {world} | {mode} | {mib:.0f} | {blocked:.2f} | {saved:.2f} | "
                f"{mib / saved:.0f} | {mib / saved / dd:.0%} | {loaded:.2f} | {mib / loaded:.0f} |"
            )
    print(f"(times: median of {args.repeats} saves and loads per row)")


if __name__ == "__main__":
    main()
