"""Training tokens/s with the per-rank phase timing and heartbeats on (`observe.timing=true
observe.heartbeat=true`, the default) against both off, side by side in one run.

Two trainers of the same job live in this process (under torchrun, in every rank), one with
observe on, one with it off; each round trains `--steps` more steps with each, alternating
which goes first, so that load on the machine hits both alike. Tokens/s of a round are timed
from the end of its first step to the end of its last (start-up and the final checkpoint of
each `fit` are outside). Prints each round, the medians and the ratio on / off.

    python benchmarks/observe_overhead.py [--rounds 7] [--steps 30] [OVERRIDE ...]
    torchrun --nproc_per_node=2 benchmarks/observe_overhead.py [...]

OVERRIDEs are train.py's (default: the embedded tiny model and corpus, fp32, the worst case:
its steps are the shortest, so the fixed cost per step weighs most).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from opt_train.config import register_configs  # noqa: E402
from opt_train.train.callbacks.base import Callback  # noqa: E402
from opt_train.train.phase_timing import PhaseTimer  # noqa: E402
from opt_train.train.trainer import Trainer  # noqa: E402

COMMON = [
    "precision=fp32",
    "logging.wandb=disabled",
    "logging.progress=false",
    "train.eval_interval=0",
    "checkpoint.interval=0",
    "checkpoint.async_save=false",
    "logging.interval=10",
]


class StepClock(Callback):
    """The wall time at the end of each step of the current `fit`."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_start(self, trainer) -> None:
        self.ends = []

    def on_step_end(self, trainer, metrics: dict) -> None:
        self.ends.append(time.perf_counter())


def build(run_dir: Path, on: bool, overrides: list[str]) -> tuple[Trainer, StepClock]:
    flag = str(on).lower()
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                f"run_dir={run_dir}",
                *COMMON,
                f"observe.timing={flag}",
                f"observe.heartbeat={flag}",
                *overrides,
            ],
        )
    clock = StepClock()
    return Trainer(OmegaConf.to_object(cfg), callbacks=[clock]), clock


def round_tokens_per_s(trainer: Trainer, clock: StepClock, steps: int) -> float:
    trainer.cfg.train.max_steps = trainer.step + steps
    trainer.fit()
    ends = clock.ends
    return (len(ends) - 1) * trainer.cfg.train.batch_tokens / (ends[-1] - ends[0])


def timer_cost_per_step(n: int = 20000) -> float:
    """Seconds of the loop's PhaseTimer calls per step (one step's spans, one take per 10
    steps), measured alone: a bound on the timing's cost that load hardly moves."""
    timer = PhaseTimer(True, torch.device("cpu"), interval=10)
    t0 = time.perf_counter()
    for step in range(1, n + 1):
        timer.begin_step(step)
        for span in ("forward_backward", "loss_reduce", "optimizer", "callbacks"):
            timer.enter(span)
        timer.enter("stop_agree")
        timer.enter("callbacks")
        if step % 10 == 0:
            timer.take()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=30, help="steps per round and setting")
    args, overrides = p.parse_known_args()
    rank = int(os.environ.get("RANK", "0"))
    # One pair of run_dirs for the job (every rank writes its checkpoint shards there).
    job = os.environ.get("MASTER_PORT", str(os.getpid()))
    root = Path(tempfile.gettempdir()) / f"observe-overhead-{job}"
    trainers = {on: build(root / f"on-{on}", on, overrides) for on in (True, False)}
    for t, c in trainers.values():  # warm-up: allocator, optimizer state, the first gather
        round_tokens_per_s(t, c, 3)
    got: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for on in order:
            got[on].append(round_tokens_per_s(*trainers[on], args.steps))
        if rank == 0:
            print(
                f"round {r}: on {got[True][-1]:.0f} tok/s, off {got[False][-1]:.0f} tok/s",
                flush=True,
            )
    for t, _ in trainers.values():
        t.close()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    if rank == 0:
        on, off = statistics.median(got[True]), statistics.median(got[False])
        cost = timer_cost_per_step()
        step_s = trainers[False][0].cfg.train.batch_tokens / off
        print(
            f"PhaseTimer calls: {cost * 1e6:.1f} us per step, {cost / step_s:.2e} of a "
            f"{step_s:.3f} s step"
        )
        world = os.environ.get("WORLD_SIZE", "1")
        print(
            f"world {world}, {args.rounds} rounds x {args.steps} steps, overrides {overrides}: "
            f"median on {on:.0f} tok/s, off {off:.0f} tok/s, on/off {on / off:.4f}; "
            f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )


if __name__ == "__main__":
    main()
