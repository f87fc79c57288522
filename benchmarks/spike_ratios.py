"""What the spike detector (opt_train/train/callbacks/stability.py) would have seen on a finished run: each
step's loss and gradient norm over the median of the previous `window` finite steps, read from
the run's metrics.jsonl. Run it on clean runs to choose `stability.loss_factor` (the false
alarms a factor would raise are the steps above it).

    python benchmarks/spike_ratios.py runs/opt-tiny/metrics.jsonl --windows 10 50
"""

from __future__ import annotations

import argparse
import json
import math
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", help="a run's metrics.jsonl")
    ap.add_argument("--windows", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--factors", type=float, nargs="+", default=[1.5, 2.0])
    args = ap.parse_args()
    with open(args.metrics, encoding="utf-8") as f:
        rows = [json.loads(x) for x in f if x.strip()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    nonfinite = sum(not math.isfinite(r["loss"]) for r in steps)
    print(
        f"{len(steps)} steps, last {steps[-1]['step']}, loss {steps[0]['loss']:.3f} -> "
        f"{steps[-1]['loss']:.3f}, non-finite {nonfinite}"
    )
    for window in args.windows:
        hist: list[tuple[float, float]] = []
        worst, worst_grad, checked = (0.0, 0), (0.0, 0), 0
        above = dict.fromkeys(args.factors, 0)
        for r in steps:
            if len(hist) >= window:  # the detector waits for a full window, as here
                checked += 1
                q = r["loss"] / statistics.median(h[0] for h in hist)
                g = r["grad_norm"] / statistics.median(h[1] for h in hist)
                worst, worst_grad = max(worst, (q, r["step"])), max(worst_grad, (g, r["step"]))
                for factor in above:
                    above[factor] += q > factor
            if math.isfinite(r["loss"]):  # the detector's history keeps finite steps only
                hist.append((r["loss"], r["grad_norm"]))
                del hist[:-window]
        counts = ", ".join(f"> {k:g}x: {v}" for k, v in above.items())
        print(
            f"window {window}: checked {checked}, max loss/median {worst[0]:.3f} (step "
            f"{worst[1]}), {counts}, max grad norm/median {worst_grad[0]:.2f} (step "
            f"{worst_grad[1]})"
        )


if __name__ == "__main__":
    main()
