"""Downstream evaluation cost: requests/s of our lm-eval model against lm-eval's own `hf` model
on the same requests, and the time of one in-loop evaluation.

1. Requests/s: the test tasks (tests/opt_train/downstream_tasks: multiple choice, next word,
   rolling perplexity), their documents repeated `--repeat` times, scored by `OptLM` over our
   OPT and by lm-eval's `HFLM` over transformers' OPTForCausalLM holding the same weights
   (`save_hf` of ours, GPT-2's tokenizer), one CPU process, fp32, the same batch size, through
   the same `opt_train.downstream.run.evaluate` (so the same lm-eval requests), alternating
   round by round so that load on the machine hits both alike. Prints the median rate of
   each and ours / HF.
2. In-loop: a tiny run (the tests' 2-layer, 32-wide OPT, 4 steps) evaluating the three test
   tasks at its final step; prints the row's `downstream_time_s` (task loading, requests,
   metrics).

    python benchmarks/downstream.py [--model opt-125m|tiny] [--rounds 3] [--repeat 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.opt_train.downstream_tasks import (  # noqa: E402
    NAMES,
    run_overrides,
    write_gpt2_shards,
    write_tasks,
)

SHAPES = {
    "opt-125m": {"n_layers": 12, "n_heads": 12, "d_model": 768},
    "tiny": {"n_layers": 2, "n_heads": 4, "d_model": 32},
}


def repeat_docs(tasks: Path, times: int) -> None:
    """Each task's JSONL documents `times` over: more requests for a steadier rate."""
    for name in NAMES:
        f = tasks / f"{name}.jsonl"
        f.write_text(f.read_text() * times)


def build_models(shape: str, work: Path, batch_size: int):
    """(ours, hf): OptLM and HFLM over the same random fp32 weights and GPT-2's tokenizer."""
    from transformers import OPTForCausalLM

    from data_pipeline.tokenizer import Tokenizer, TokenizerSpec
    from opt_train.config import ModelConfig
    from opt_train.downstream.harness import OptLM
    from opt_train.model.hf import hf_tokenizer
    from opt_train.model.opt import OPT
    from opt_train.tools.hf_export import save_hf
    from tests.opt_train.test_downstream import lm_eval_hf_model

    torch.manual_seed(0)
    cfg = ModelConfig(name=shape, dropout=0.0, attention_dropout=0.0, **SHAPES[shape])
    model = OPT(cfg).eval()
    record = Tokenizer(TokenizerSpec("gpt2")).describe()
    save_hf(model, cfg, work / "hf", tokenizer=record)
    tok, _ = hf_tokenizer(record, cfg.vocab_size, cfg.max_positions)
    ours = OptLM(model, tok, cfg.max_positions, torch.device("cpu"), "fp32", batch_size)
    hf = lm_eval_hf_model(work / "hf")
    hf.batch_size_per_gpu = batch_size
    assert isinstance(hf.model, OPTForCausalLM)
    return ours, hf


def rate(lm, tasks: Path) -> tuple[float, int]:
    """(requests/s, requests) of one evaluation of the test tasks."""
    from opt_train.downstream.run import evaluate

    t0 = time.perf_counter()
    results = evaluate(lm, NAMES, str(tasks), log_samples=True, bootstrap_iters=0)
    dt = time.perf_counter() - t0
    n = sum(len(s["resps"]) for task in NAMES for s in results["samples"][task])
    return n / dt, n


def in_loop_time(work: Path, tasks: Path) -> float:
    """`downstream_time_s` of a tiny run's final-step evaluation."""
    import json

    from opt_train.train.trainer import Trainer
    from tests.opt_train.conftest import make_config

    data = write_gpt2_shards(work / "shards")
    run = work / "run"
    trainer = Trainer(make_config(*run_overrides(run, data, tasks, "train.max_steps=4")))
    trainer.fit()
    trainer.close()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["downstream_time_s"] for r in rows if "downstream_time_s" in r)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SHAPES), default="opt-125m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        loop_tasks = write_tasks(work / "loop-tasks")
        loop_s = in_loop_time(work, loop_tasks)
        tasks = write_tasks(work / "tasks")
        repeat_docs(tasks, args.repeat)
        ours, hf = build_models(args.model, work, args.batch_size)
        rates: dict[str, list[float]] = {"ours": [], "hf": []}
        for _ in range(args.rounds):
            for name, lm in (("ours", ours), ("hf", hf)):
                r, n = rate(lm, tasks)
                rates[name].append(r)
        med = {k: statistics.median(v) for k, v in rates.items()}
        head = f"model {args.model}, fp32, 1 CPU process, {n} requests a round"
        print(f"{head}, batch {args.batch_size}")
        print(f"{'':<28}{'requests/s':>12}")
        print(f"{'ours (OptLM)':<28}{med['ours']:>12.1f}")
        print(f"{'lm-eval hf (HFLM)':<28}{med['hf']:>12.1f}")
        print(f"ratio ours / hf: {med['ours'] / med['hf']:.2f}")
        print(f"one in-loop evaluation of the test tasks (tiny run): {loop_s:.2f} s")


if __name__ == "__main__":
    main()
