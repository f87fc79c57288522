"""Tokens/s and peak memory per rank of the real `train.py` per layout and engine on CPU.

Each configuration runs under torchrun (gloo) with the same global batch; every rank reports its
peak resident memory (ru_maxrss) at exit. With FSDP the parameters, gradients and optimizer state
are split across ranks, so memory per rank must fall as ranks are added; on a 2-core machine
speed is not expected to scale (the ranks share the cores).

Configs: `N` (N ranks of FSDP2), `NxtpT` (N x T ranks, FSDP2 x tensor parallel), `NxzeroS`
(N ranks of DeepSpeed ZeRO stage S, engine=deepspeed), `NxzeroSoff` (the same with the optimizer
offloaded to host memory). FSDP2 runs start sharded (`parallel.init=meta`) unless the name ends
in `full` (`2full`: every rank builds the whole model first, as DeepSpeed always does; `init`
column).

    python benchmarks/parallel.py [--model opt-125m] [--steps 4] [--configs 1,2,4,2xtp2]
    python benchmarks/parallel.py --configs 2,2full,2xzero1,2xzero2,2xzero3,2xzero3off  # engines
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _worker() -> None:
    """Inside a rank: run train.py, then record this process's peak RSS beside the metrics."""
    out = Path(os.environ["BENCH_OUT"])

    def report() -> None:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (out / f"peak_rss_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(peak_mib))

    import atexit

    atexit.register(report)
    sys.path.insert(0, str(REPO))
    sys.argv = [str(REPO / "train.py"), *sys.argv[2:]]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


def layout(config: str) -> tuple[int, list[str], str]:
    """(ranks, overrides, init) for a config name (see the module docstring)."""
    if "xzero" in config:
        n, _, stage = config.partition("xzero")
        offload = stage.endswith("off")
        stage = stage.removesuffix("off")
        return (
            int(n),
            [
                "engine=deepspeed",
                f"deepspeed.stage={stage}",
                f"deepspeed.offload_optimizer={str(offload).lower()}",
            ],
            "full",
        )
    # Sharded from the start (no rank builds the whole model) unless the name ends in "full".
    init = "full" if config.endswith("full") else "meta"
    n, _, tp = config.removesuffix("full").partition("xtp")
    return int(n) * int(tp or 1), [f"parallel.tp={tp or 1}", f"parallel.init={init}"], init


def run(config: str, model: str, steps: int, work: Path, shards: Path) -> dict:
    nproc, engine_overrides, init = layout(config)
    run_dir = work / f"run-{config}"
    overrides = [
        f"+model={model}",
        f"run_dir={run_dir}",
        f"data.path={shards}",
        "data.seq_len=128",
        "train.micro_batch_size=1",
        "train.batch_tokens=512",
        f"train.max_steps={steps}",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "precision=fp32",
        "logging.wandb=disabled",
        "logging.progress=false",
        # A synchronous final save (no staging copy), so peak RSS shows training's.
        "checkpoint.async_save=false",
        *engine_overrides,
    ]
    # glibc keeps freed memory: per-thread arenas (gloo, autograd threads) and a dynamic mmap
    # threshold that moves large freed blocks onto the heap. Without these two settings a
    # 2-rank FSDP run's RSS exceeded one process's (3.5 vs 2.8 GiB measured here); with them
    # RSS follows the tensors. Setting the trim threshold also fixes the mmap threshold.
    env = dict(
        os.environ,
        BENCH_OUT=str(work),
        OMP_NUM_THREADS=str(max(1, 2 // nproc)),
        MALLOC_ARENA_MAX="2",
        MALLOC_TRIM_THRESHOLD_=str(64 << 20),
    )
    for f in work.glob("peak_rss_rank*.json"):
        f.unlink()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",  # rendezvous on a free local port
        __file__,
        "--worker",
        *overrides,
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{config} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = statistics.median(r["tokens_per_s"] for r in rows[1:] if "loss" in r)
    peaks = [json.loads((work / f"peak_rss_rank{i}.json").read_text()) for i in range(nproc)]
    return {
        "config": config,
        "ranks": nproc,
        "init": init,
        "tokens_per_s": tps,
        "peak_rss_mib": max(peaks),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker()
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--configs", default="1,2,4,2xtp2", help="N, NxtpT, NxzeroS, NxzeroSoff")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.opt_train.conftest import write_patterned_shards

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = write_patterned_shards(work / "shards", vocab=50272, docs=400)
        results = [run(c, args.model, args.steps, work, shards) for c in args.configs.split(",")]
    base = results[0]
    print(f"{args.model}, fp32, seq 128, 512 tokens per step, {args.steps} steps, gloo on CPU")
    first = f"x {base['config']}"
    print(
        f"{'config':>10} {'ranks':>5} {'init':>5} {'tokens/s':>9} {first:>8} "
        f"{'peak RSS/rank MiB':>18} {first:>8}"
    )
    for r in results:
        print(
            f"{r['config']:>10} {r['ranks']:>5} {r['init']:>5} {r['tokens_per_s']:>9.0f} "
            f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f}x {r['peak_rss_mib']:>18.0f} "
            f"{r['peak_rss_mib'] / base['peak_rss_mib']:>7.2f}x"
        )


if __name__ == "__main__":
    main()
