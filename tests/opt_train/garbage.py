"""The corpus with garbage documents that the spike-recovery tests train on, and what those
tests share: the tiny model's overrides, the detector's settings, metrics readers, and the
2-rank run with a rollback (run once a session by tests/conftest.py's `two_rank_rollback`:
tests/opt_train/test_stability.py replays it by hand, the two-node Slurm test compares its
floats with it).

The corpus: the tiny corpus's English-like documents with three documents of random characters
(~600 GPT-2 tokens, 4-5 windows each) among them, built by the project's own tokenize stage.
With one 128-token sequence per step the tiny model's loss is ~4.5 by step 20, and a step that
reads a garbage window jumps to 11-16. The seeds are chosen so that, in the loader's global
order, garbage windows come at known steps (checked by the tests, so a change of the corpus or
of the order fails loudly instead of testing nothing).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from data_pipeline.shards import iter_documents
from data_pipeline.stages.tokenize import TokenizeConfig, TokenizerConfig
from data_pipeline.stages.tokenize import run as tokenize
from data_pipeline.tiny_corpus import tiny_documents
from opt_train.data.loader import GlobalOrderLoader, PackedWindows

SEQ = 128
STRONG = 100  # a window with this many garbage tokens (of 129) is a garbage window


def build_garbage_corpus(root: Path) -> tuple[Path, set[int]]:
    """(shard directory, indices of the garbage windows), built under `root`."""
    docs = tiny_documents(seed=1, num_docs=300)
    rng = random.Random(7)
    alphabet = (
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!@#$%^&*()[]{};:,.<>/?|~"
    )
    for k, pos in enumerate((60, 150, 240)):
        text = "".join(rng.choice(alphabet) for _ in range(700))
        docs.insert(pos, {"text": text, "id": f"garbage-{k}", "meta": {}})
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    shards = root / "shards"
    tokenize(
        TokenizeConfig(
            input=str(src),
            output=str(shards),
            tokenizer=TokenizerConfig(name="gpt2"),
            validation_fraction=0.0,  # every document in train, in input order
        )
    )
    lengths = [len(d) + 1 for d in iter_documents(shards, "train")]  # + the separator
    starts = np.cumsum([0, *lengths[:-1]])
    spans = [
        (int(starts[i]), int(starts[i] + lengths[i]))
        for i, d in enumerate(docs)
        if d["id"].startswith("garbage")
    ]
    n = len(PackedWindows(shards, "train", SEQ))
    bad = set()
    for w in range(n):
        a, b = w * SEQ, w * SEQ + SEQ + 1
        if sum(max(0, min(b, e) - max(a, s)) for s, e in spans) >= STRONG:
            bad.add(w)
    assert 10 <= len(bad) <= 15, bad
    return shards, bad


def overrides(run_dir: Path, data: Path, *extra: str) -> list[str]:
    """The tiny model (dropout on), fp32, one sequence per step, a checkpoint every 5 steps."""
    return [
        f"run_dir={run_dir}",
        f"data.path={data}",
        f"data.seq_len={SEQ}",
        "train.micro_batch_size=1",
        f"train.batch_tokens={SEQ}",
        "train.eval_interval=0",
        "precision=fp32",
        "logging.wandb=disabled",
        "logging.progress=false",
        "logging.peak_tflops=1.0",
        "optim.warmup_tokens=1280",
        "optim.decay_tokens=1280000",
        "checkpoint.interval=5",
        "checkpoint.keep=10",
        *extra,
    ]


STABLE = [
    "stability.enabled=true",
    # Below the default 2: on 2 ranks one garbage sequence of two lifts the step's mean loss
    # to about (11 + 4.5) / 2, 1.7x the clean ~4.5.
    "stability.loss_factor=1.5",
    "stability.window=10",
    "stability.lr_factor=0.5",
    "stability.lr_steps=5",
]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir: Path) -> dict[int, dict]:
    out = {}
    for r in rows(run_dir):
        if "event" not in r and "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r
    return out


def garbage_steps(data: Path, bad: set[int], seed: int, batch: int, n_steps: int, skips=()):
    """Steps (1-based) whose global batch holds a garbage window, in the loader's order."""
    loader = GlobalOrderLoader(PackedWindows(data, "train", SEQ), seed, batch, 1, skip_steps=skips)
    found = []
    for step in range(1, n_steps + 1):
        first = loader.samples_seen
        loader.next_step()
        # After a skip the step's batch starts where the jump left the counter.
        start = loader.samples_seen - batch
        assert start >= first
        if any(loader.sample_index(g) in bad for g in range(start, start + batch)):
            found.append(step)
    return found


# The 2-rank case: seed 21 puts a garbage window in the batch of step 23 (two sequences per
# step, one per rank under FSDP2); the mesh key is added by the caller.
TWO_RANKS = ["train.seed=21", "train.batch_tokens=256", "train.max_steps=24"]
