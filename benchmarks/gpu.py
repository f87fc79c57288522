"""One-shot GPU check: correctness, speed and MFU, memory against the planner, a Hugging Face
baseline and async checkpoint staging, printed as one table (rows as they finish).

    python benchmarks/gpu.py                # one CUDA GPU; under 8 minutes on an H100/H200
    python benchmarks/gpu.py --dry-run      # the same code on CPU at tiny shapes (CI runs it)

1. correctness, the tiny model's first 20 losses, same init and data, dropout 0:
   CUDA fp32 vs CPU fp32 (TF32 off) within 1e-4 relative; CUDA bf16 vs CUDA fp32 within 2e-2;
   compile on vs off (fp32) within 1e-3.
2. speed, OPT-1.3B and OPT-2.7B at seq 2048, bf16, FSDP2 on one rank, compile on/off x
   activation checkpointing off/selective/full: tokens/s, TFLOP/s, MFU against the GPU's dense
   bf16 peak (opt_train/train/flops.py), peak allocated memory beside opt_train/tools/plan.py's.
3. baseline: transformers' OPTForCausalLM (SDPA attention) + torch AdamW under bf16 autocast
   at the same shape and micro-batch, tokens/s, and our best row's ratio to it.
4. checkpoint: async save of the 1.3B model and AdamW state through CheckpointManager with
   pinned staging: time the training thread is blocked, and bandwidth to a visible checkpoint.

Rows run in order of importance; a row whose estimated time would pass `--budget-s` is printed
as skipped, so the whole run stays under the budget. With `--dry-run` the "CUDA" side is the
CPU too: the correctness rows then check that the code paths agree (same data, same init,
compile), not the GPU; speed rows have no targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The repository, not this script's folder, first on the path: benchmarks/tokenize*.py must not
# shadow the standard library.
sys.path[0] = str(REPO)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.gpu_cases import (  # noqa: E402
    Shapes,
    SpeedResult,
    Table,
    baseline_row,
    checkpoint_row,
    correctness,
    dry_shapes,
    fresh,
    gpu_shapes,
    init_one_rank,
    pick_micro_batch,
    speed_row,
)
from opt_train.train.flops import gpu_peak_tflops  # noqa: E402

# -- the run --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (what CI runs)")
    ap.add_argument("--budget-s", type=float, default=None, help="default 450 (GPU), 120 (dry)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where checkpoints are written")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)

    if args.dry_run:
        device, shapes = torch.device("cpu"), dry_shapes()
        budget = args.budget_s or 120.0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run for the CPU check")
        from opt_train.parallel.process_groups import ALLOC_CONF_VARS, pick_device

        device, shapes = pick_device("cuda", 0), gpu_shapes()  # allocator and TF32 settings
        budget = args.budget_s or 450.0
    init_one_rank(device)
    table = Table(budget_s=budget)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        driver = _driver_version()
        print(
            f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, driver {driver}, "
            f"Python {sys.version.split()[0]}, allocator "
            + " ".join(f"{v}={os.environ[v]}" for v in ALLOC_CONF_VARS if v in os.environ)
        )
        torch.zeros(1, device=device)  # the allocator starts with its settings read
        print(f"expandable segments in effect: {_expandable_segments()}")
        found = gpu_peak_tflops(name, "bf16", tf32=False)
        peak = found[1] if found else None
    else:
        from opt_train.train.flops import device_peak_flops

        print(f"dry run on CPU: torch {torch.__version__}, {torch.get_num_threads()} threads")
        peak = device_peak_flops(device, "bf16", None) / 1e12  # this CPU's measured bf16 rate
    against = f"{peak:.4g} TFLOP/s" if peak else "unknown (MFU NaN)"
    print(f"MFU against {against} (dense bf16); budget {budget:.0f} s")
    table.header()
    try:
        run(table, shapes, device, peak, Path(args.dir))
    finally:
        print(f"(total {table.elapsed():.0f} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(table.rows, indent=1))
        dist.destroy_process_group()
    return table.rows


def _expandable_segments() -> str:
    """What the CUDA caching allocator says about expandable segments (the setting, not the
    environment variable: some torch versions ignore one of the variable's names)."""
    try:
        settings = torch.cuda.memory._snapshot().get("allocator_settings", {})
    except Exception as e:  # a private API: report, do not fail the run
        return f"unknown ({type(e).__name__})"
    return str(settings.get("expandable_segments", "unknown (not in the snapshot)"))


def _driver_version() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "?"
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def attempt(table: Table, section: str, case: str, fn):
    """fn(); an error becomes a failed row (traceback on stderr) and the run goes on, so
    one broken path does not cost the rest of a scarce GPU run."""
    try:
        return fn()
    except Exception as e:
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        table.add(section, case, f"error: {type(e).__name__}: {first}", ok=False)
        return None


def row_order(shapes: Shapes, names: list[str]) -> list[tuple[str, bool, str]]:
    """The speed rows as (model, compile, AC mode), most important first: the configuration
    users run (compile on, AC off), whose baseline and checkpoint rows follow it, then the
    other modes."""
    order = [(n, True, "off") for n in names]
    order += [(n, False, "off") for n in names]
    order += [(n, True, ac) for n in names for ac in shapes.compile_ac if ac != "off"]
    order += [(n, False, ac) for n in names for ac in shapes.ac_modes if ac != "off"]
    return order


def run(table: Table, shapes: Shapes, device, peak_tflops: float | None, ckpt_dir: Path) -> None:
    attempt(table, "correctness", "all rows", lambda: correctness(table, shapes, device))
    fresh(device)

    torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer runs (bf16 does not use it)
    torch.backends.cudnn.allow_tf32 = True
    names = list(shapes.models)
    mbs = {n: pick_micro_batch(shapes, shapes.models[n], device) for n in names}
    for n in names:
        if mbs[n] is None:
            table.add("speed", n, "does not fit even at micro-batch 1 (planner)", ok=False)
    names = [n for n in names if mbs[n] is not None]
    cost = {
        True: 90.0 if device.type == "cuda" else 15.0,
        False: 30.0 if device.type == "cuda" else 5.0,
    }
    best: dict[str, SpeedResult] = {}
    baseline_done: set[str] = set()
    ckpt_done = False
    for n, compile, ac in row_order(shapes, names):
        model_cfg, mb = shapes.models[n], mbs[n]
        if not table.fits(cost[compile]):
            table.add(
                "speed",
                f"{n}, compile {'on' if compile else 'off'}, AC {ac}",
                "time budget",
                ok="skipped",
            )
            continue
        t0 = time.perf_counter()
        case = f"{n} mb {mb}, compile {'on' if compile else 'off'}, AC {ac}"
        out = attempt(
            table,
            "speed",
            case,
            partial(speed_row, table, shapes, device, n, model_cfg, mb, compile, ac, peak_tflops),
        )
        result, model, optimizer = out or (None, None, None)
        out = None
        cost[compile] = max(cost[compile] * 0.5, time.perf_counter() - t0)
        if result and (n not in best or result.tokens_per_s > best[n].tokens_per_s):
            best[n] = result
        if result and not ckpt_done and n == names[-1] and table.fits(60.0):
            # (no name kept for the call: it would hold the model past this row)
            attempt(
                table,
                "checkpoint",
                f"async save, {n}",
                partial(checkpoint_row, table, device, n, model, optimizer, ckpt_dir),
            )
            ckpt_done = True
        model = optimizer = None
        fresh(device)
        if compile and ac == "off" and n not in baseline_done:
            baseline_done.add(n)
            if table.fits(cost[False] * 1.5):
                hf = partial(baseline_row, table, shapes, device, n, model_cfg, mb, best.get(n))
                attempt(table, "baseline", f"HF {n}", hf)
                fresh(device)
            else:
                table.add("baseline", f"HF {n}", "time budget", ok="skipped")
    if not ckpt_done:
        table.add("checkpoint", "async save", "time budget or no model", ok="skipped")
    if device.type == "cuda" and names and names[0] in best:
        mfu = best[names[0]].mfu
        table.add(
            "target",
            f"{names[0]} best MFU (one GPU, bf16)",
            f"{mfu:.1%}",
            ">= 45%",
            mfu >= 0.45 if not math.isnan(mfu) else False,
        )


if __name__ == "__main__":
    main()
