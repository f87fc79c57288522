"""The embedded default (`torchrun train.py` with no data and no batch settings) at 2 ranks, on
a fresh corpus cache: one rank builds the tiny corpus while the other waits, and the micro-batch
is derived from the global batch."""

from __future__ import annotations

import json

import pytest

from tests.multirank import torchrun_train
from tests.opt_train.conftest import make_config


@pytest.mark.parametrize(("dp", "micro", "accum"), [(1, 8, 1), (2, 4, 1), (4, 2, 1)])
def test_default_micro_batch_is_derived_for_1_2_and_4_ranks(dp, micro, accum):
    cfg = make_config()
    assert cfg.train.micro_batch_size is None and cfg.global_batch_samples() == 8
    assert cfg.resolve_micro_batch(dp) == micro and cfg.grad_accum_steps(dp) == accum


def test_derived_micro_batch_is_capped_and_divides_the_share():
    cfg = make_config("+model=opt-125m")  # 256 sequences of 2048 per step
    assert cfg.resolve_micro_batch(8) == 8 and cfg.grad_accum_steps(8) == 4
    cfg = make_config("data.seq_len=128", "train.batch_tokens=1536")  # 12 sequences
    assert cfg.resolve_micro_batch(2) == 6 and cfg.resolve_micro_batch(1) == 6
    assert cfg.grad_accum_steps(1) == 2
    with pytest.raises(ValueError, match=r"train.batch_tokens=1536 .* 8 data-parallel ranks"):
        cfg.grad_accum_steps(8)


def test_set_micro_batch_is_kept():
    cfg = make_config("train.micro_batch_size=2")
    assert cfg.resolve_micro_batch(2) == 2 and cfg.grad_accum_steps(2) == 2


@pytest.mark.slow
@pytest.mark.multirank
def test_torchrun_two_ranks_on_the_embedded_default_with_a_fresh_cache(tmp_path):
    run_dir = tmp_path / "run"
    r = torchrun_train(
        2,
        [
            f"run_dir={run_dir}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=2",
            "logging.wandb=disabled",
            "logging.progress=false",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "1 micro-batches of 4 per rank per step" in r.stderr
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert (run_dir / "checkpoints" / "step_00000002" / "meta.json").is_file()
    cache = tmp_path / "cache" / "tiny-corpus"
    assert sorted(p.name for p in cache.glob("tiny-0.jsonl*")) == ["tiny-0.jsonl"]
    # One rank built, the other waited: the chain's report is rewritten by every chain run, and
    # the last one (the rank that waited for the lock) found every step complete and ran none.
    report = json.loads((cache / "work" / "chain.report.json").read_text())
    assert report["ran"] == [], report
    assert report["skipped"] == ["ingest:tiny", "clean:tiny", "dedup:all", "tokenize:tokens"]
