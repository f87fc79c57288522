"""Training tokens/s of our step against transformers.OPTForCausalLM + torch AdamW.

Same shape (OPT-125m), batch (micro-batch 4 x seq 256), dropout (0.1, attention 0.1) and
precision, one CPU process, run in this process with the two alternating round by round so
that load on the machine hits both alike. Prints a table and the ratio ours / HF.

    python benchmarks/train_step.py [--precision fp32,bf16] [--rounds 3] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def make_ours(precision: str):
    from opt_train.config import ModelConfig, OptimConfig
    from opt_train.engine.loss import lm_loss
    from opt_train.engine.optim import build_optimizer
    from opt_train.model.opt import OPT

    torch.manual_seed(0)
    model = OPT(ModelConfig(name="opt-125m", n_layers=12, n_heads=12, d_model=768))
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    return training_step(model, opt, precision, lambda x: lm_loss(model, x[:, :-1], x[:, 1:]))


def make_hf(precision: str):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(dropout=0.1, attention_dropout=0.1)  # OPT-125m shape is HF's default
    model = OPTForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return training_step(
        model, opt, precision, lambda x: model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
    )


def training_step(model, opt, precision: str, loss_of):
    """One optimizer step on a batch, the same for both models: forward under autocast,
    backward, clipping at 1.0, AdamW."""
    from opt_train.engine.precision import autocast

    model.train()

    def step(x: torch.Tensor) -> float:
        with autocast(precision, "cpu"):
            loss = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step, x: torch.Tensor, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    x = torch.randint(
        0, 50272, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)
    )
    tokens = args.batch * args.seq
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OPT-125m, "
        f"micro-batch {args.batch} x seq {args.seq}, dropout 0.1, {_load()}"
    )
    print(f"{'precision':>9} {'ours tok/s':>11} {'HF tok/s':>10} {'ours/HF':>8}")
    for precision in args.precision.split(","):
        ours, hf = make_ours(precision), make_hf(precision)
        ours(x), hf(x)  # warm-up: allocator, kernels, optimizer state
        t_ours, t_hf = [], []
        for _ in range(args.rounds):
            t_ours.append(timed(ours, x, args.steps))
            t_hf.append(timed(hf, x, args.steps))
        o, h = statistics.median(t_ours), statistics.median(t_hf)
        print(f"{precision:>9} {tokens / o:>11.0f} {tokens / h:>10.0f} {h / o:>7.2f}x")
        del ours, hf
    print(f"at the end: {_load()}")


def _load() -> str:
    """The machine's load average: the figures mean little when other jobs share the cores."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
