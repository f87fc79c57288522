"""Tokens/s of `python train.py` at the default `precision: auto` against `precision=fp32` (and,
with --bf16, the explicit bf16 run), each in a fresh run_dir, in one go. On a CPU without native
bf16 matmuls auto must resolve to fp32 and run at fp32's speed (ratio near 1); the explicit bf16
run shows what the old bf16 default cost there.

    python benchmarks/precision_default.py [--steps 12] [--rounds 2] [--bf16] [overrides...]
    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 python benchmarks/precision_default.py

tokens/s is the median over the steps after the first (the first includes warm-up) of the
`tokens_per_s` column of each run's metrics.jsonl; with --rounds N the fp32 and default runs
alternate N times (swapping which goes first) and each reports its best round (on a shared machine the others' load only
ever slows a run down).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(precision: str | None, steps: int, extra: list[str], work: Path) -> dict:
    """One train.py run; its median tokens/s and the header line that names its precision."""
    run_dir = work / (precision or "default")
    cmd = [sys.executable, str(ROOT / "train.py"), f"train.max_steps={steps}"]
    cmd += [f"run_dir={run_dir}", "logging.wandb=disabled", "checkpoint.interval=0", *extra]
    if precision:
        cmd.append(f"precision={precision}")
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "loss" in r and "event" not in r]
    header = next((x for x in out.stdout.splitlines() if x.startswith("precision ")), "?")
    return {"rate": statistics.median(rates[1:] or rates), "header": header, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="also the explicit precision=bf16 run")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = ap.parse_args()
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="precision-bench-") as tmp:
        # Each round swaps which goes first, so that neither always meets the same load.
        pairs = [["fp32", None][:: 1 if r % 2 == 0 else -1] for r in range(args.rounds)]
        runs = [name for pair in pairs for name in pair] + (["bf16"] if args.bf16 else [])
        for i, name in enumerate(runs):
            r = run(name, args.steps, args.overrides, Path(tmp) / str(i))
            label = name or "default (auto)"
            print(
                f"{label:>15}: {r['rate']:,.0f} tokens/s median ({r['wall']:.0f} s wall) | "
                f"{r['header']}",
                flush=True,
            )
            if label not in best or r["rate"] > best[label]["rate"]:
                best[label] = r
    fp32 = best["fp32"]["rate"]
    print(f"best of {args.rounds}: default / fp32 = {best['default (auto)']['rate'] / fp32:.2f}")
    if args.bf16:
        print(f"bf16 / fp32 = {best['bf16']['rate'] / fp32:.3f}")


if __name__ == "__main__":
    main()
