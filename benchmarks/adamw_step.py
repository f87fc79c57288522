"""CPU time of one AdamW step on FSDP2 shards (CPU DTensors): the optimizer the trainer builds
(`opt_train.engine.optim.build_optimizer`: the foreach kernels) against torch's default for CPU
tensors (its per-parameter loop, `foreach=False`), side by side in every rank.

Both optimizers hold the same sharded model's parameters and gradients; each round times
`--steps` steps of each, alternating which goes first, by the process's CPU clock. Prints
rank 0's medians and the ratio. Run under torchrun (gloo):

    torchrun --nproc_per_node=2 benchmarks/adamw_step.py [--rounds 5] [--steps 20]
        [--d-model 32] [--vocab 512]

The defaults are the test suite's 32-wide model; `--d-model 128 --vocab 50272` is the embedded
default's shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from opt_train.config import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from opt_train.engine.optim import build_optimizer, param_groups  # noqa: E402
from opt_train.model.opt import OPT  # noqa: E402
from opt_train.parallel.apply import parallelize  # noqa: E402
from opt_train.parallel.dims import ParallelDims  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    args = p.parse_args()

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    dims = ParallelDims.from_config(ParallelConfig(dp_shard=world), world)
    mesh, _ = dims.build_mesh("cpu")
    model = OPT(ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=4))
    parallelize(model, dims, mesh, "fp32", "off", False)
    for q in model.parameters():
        q.grad = torch.full_like(q, 1e-3)
    cfg = OptimConfig()
    optimizers = {
        "ours (foreach)": build_optimizer(model, cfg),
        "torch's CPU default (loop)": torch.optim.AdamW(
            param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
        ),
    }
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["lr"] = 1e-4
        opt.step()  # allocates the moments outside the timing

    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for r in range(args.rounds):
        names = list(optimizers) if r % 2 == 0 else list(reversed(optimizers))
        for name in names:
            t0 = time.process_time()
            for _ in range(args.steps):
                optimizers[name].step()
            times[name].append((time.process_time() - t0) / args.steps * 1e3)
    if dist.get_rank() == 0:
        print(f"AdamW step on {world} FSDP2 ranks, d_model {args.d_model}, vocab {args.vocab}")
        for name, ms in times.items():
            rounds = " ".join(f"{x:.1f}" for x in ms)
            print(f"  {name:28s} {statistics.median(ms):7.2f} ms CPU per step ({rounds})")
        ours, loop = (statistics.median(v) for v in times.values())
        print(f"  loop / ours: {loop / ours:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
