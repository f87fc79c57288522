"""Train-time data mixing: sources by weight, exact per global batch, resumable anywhere."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.shards import ShardWriter, read_manifest
from data_pipeline.stages.tokenize import TokenizeConfig, TokenizerConfig
from data_pipeline.stages.tokenize import run as tokenize
from opt_train.data.loader import GlobalOrderLoader, PackedWindows, Source, open_sources
from opt_train.data.mixture import MAX_PERIOD, Mixture, integer_weights
from opt_train.train.metric_rows import flat_row
from opt_train.train.trainer import Trainer
from tests.multirank import TINY_RUN
from tests.opt_train.conftest import make_config, small_job, train_on_ranks

SPLIT = 256  # source "a" writes token ids in [1, 256), source "b" in [256, 512)


def write_range_shards(path: Path, low: int, high: int, docs: int, seed: int) -> Path:
    """Patterned documents (a fixed successor table, so the loss falls) whose ids all lie in
    [low, high): a window's tokens say which source it came from. Every tenth is held out."""
    rng = np.random.default_rng(seed)
    succ = low + rng.permutation(high - low)
    tok = {"name": "synthetic", "vocab_size": 512, "eos_id": 0}
    with ShardWriter(path, tok, max_shard_tokens=4000) as w:
        for i in range(docs):
            ids = [int(rng.integers(low, high))]
            for _ in range(int(rng.integers(20, 120))):
                ids.append(int(succ[ids[-1] - low]))
            w.add(np.array(ids), "validation" if i % 10 == 0 else "train")
    return path


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    a = write_range_shards(root / "a", 1, SPLIT, docs=300, seed=1)
    b = write_range_shards(root / "b", SPLIT, 512, docs=150, seed=2)
    return a, b


def untimed(row: dict) -> dict:
    """A row without its wall-clock fields (speed, MFU, the per-rank phase `timing`)."""
    return {
        k: v for k, v in row.items() if k not in ("tokens_per_s", "mfu", "step_time_s", "timing")
    }


def mixed_job(run_dir: Path, *extra: str):
    """conftest's small job with no data.path (the sources come in `extra`)."""
    return small_job(run_dir, "null", *extra)


def sources_override(a: Path, b: Path, wa: float = 3, wb: float = 1) -> str:
    return f"data.sources=[{{name:a,path:'{a}',weight:{wa}}},{{name:b,path:'{b}',weight:{wb}}}]"


def mixed_loaders(a, b, world, seq=32, weights=(3, 1), **kw) -> list[GlobalOrderLoader]:
    srcs = [
        Source("a", PackedWindows(a, "train", seq), weights[0]),
        Source("b", PackedWindows(b, "train", seq), weights[1]),
    ]
    return [GlobalOrderLoader(srcs, 0, 8, 2, r, world, **kw) for r in range(world)]


def global_batches(loaders, steps) -> list[np.ndarray]:
    """Each step's global batch (all ranks, rank order), as full windows."""
    out = []
    for _ in range(steps):
        rows = [
            np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)
            for ld in loaders
            for x, y in ld.next_step()
        ]
        out.append(np.concatenate(rows))
    return out


def source_of_window(row: np.ndarray) -> str:
    """Which source a window came from, by its tokens (separators, id 0, say nothing)."""
    ids = row[row > 0]
    assert (ids < SPLIT).all() or (ids >= SPLIT).all(), "a window mixes two sources"
    return "a" if ids[0] < SPLIT else "b"


@pytest.mark.parametrize(
    "weights",
    [[3, 1], [1, 1, 1], [0.5, 0.3, 0.2], [7, 5, 3, 2, 1], [180, 112, 65, 48, 21], [1, 999]],
)
def test_every_prefix_of_the_layout_holds_each_share_to_less_than_one_sample(weights):
    m = Mixture(weights)
    a, total = np.array(integer_weights(weights)), sum(integer_weights(weights))
    n = np.arange(3 * m.period + 1)
    got = m.counts_before(n)
    # Counted from the labels themselves, not from the table under test.
    labels = m.source_of(n[:-1])
    assert np.array_equal(got[1:], np.cumsum(labels[:, None] == np.arange(len(a)), axis=0))
    lo, hi = (n[:, None] * a) // total, -(-(n[:, None] * a) // total)
    assert (lo <= got).all() and (got <= hi).all()
    shares = np.array(weights, dtype=float) / sum(weights)
    assert np.allclose(a / total, shares, rtol=1e-12)


def test_weights_that_do_not_reduce_are_rounded_to_a_bounded_period():
    w = integer_weights([0.123457, 0.2, 0.333331, 0.3], max_period=1000)
    assert sum(w) == 1000 and w == [129, 209, 348, 314]


def test_two_sources_at_3_to_1_give_6_and_2_in_every_global_batch_on_any_world_size(two_sources):
    a, b = two_sources
    one = global_batches(mixed_loaders(a, b, 1), 40)
    for world in (2, 4):
        many = global_batches(mixed_loaders(a, b, world), 40)
        assert all(np.array_equal(x, y) for x, y in zip(one, many, strict=True)), world
    per_batch = [[source_of_window(r) for r in batch] for batch in one]
    assert all(labels.count("a") == 6 and labels.count("b") == 2 for labels in per_batch)
    tokens = {s: 32 * sum(labels.count(s) for labels in per_batch) for s in "ab"}
    assert tokens["a"] == 3 * tokens["b"]
    ld = mixed_loaders(a, b, 1)[0]
    global_batches([ld], 40)
    assert ld.tokens_by_source() == tokens
    # Within a pass a source never repeats a window.
    a_windows = [w for i, w in map(ld.sample, range(320)) if i == 0]
    assert len(a_windows) == 240 == len(set(a_windows))


def test_resume_and_skip_steps_continue_the_same_mixed_sequence(two_sources):
    a, b = two_sources
    straight = global_batches(mixed_loaders(a, b, 1), 9)
    first = mixed_loaders(a, b, 1)[0]
    global_batches([first], 4)
    state = json.loads(json.dumps(first.state_dict()))  # as state.json stores it
    resumed = mixed_loaders(a, b, 2)  # on another world size
    for ld in resumed:
        ld.load_state_dict(state)
    rest = global_batches(resumed, 5)
    assert all(np.array_equal(x, y) for x, y in zip(straight[4:], rest, strict=True))
    skipping = global_batches(mixed_loaders(a, b, 2, skip_steps=[(2, 3), (6, 6)]), 5)
    want = [straight[i] for i in (0, 3, 4, 6, 7)]
    assert all(np.array_equal(x, y) for x, y in zip(want, skipping, strict=True))
    # Another mixture cannot resume this position.
    other = mixed_loaders(a, b, 1, weights=(2, 1))[0]
    with pytest.raises(ValueError, match="sources"):
        other.load_state_dict(state)


def test_a_used_up_source_repeats_in_a_fresh_order_and_says_so_once(two_sources, caplog):
    a, b = two_sources
    ld = mixed_loaders(a, b, 1, weights=(1, 1))[0]
    n_b = int(ld.sizes[1])
    steps = (2 * n_b) // 4 + 2  # 4 samples of b per batch: into its third pass
    said = []
    with caplog.at_level(logging.WARNING, logger="opt_train.data.loader"):
        for _ in range(steps):
            rows = np.concatenate([x.numpy() for x, _ in ld.next_step()])
            assert [source_of_window(r) for r in rows].count("b") == 4
            said.append(list(ld.repeated_this_step))
    assert said.count(["b"]) == 1 and sum(map(len, said)) == 1
    assert said.index(["b"]) == n_b // 4  # the step holding b's sample number n_b
    assert sum("b used all its windows" in r.message for r in caplog.records) == 1
    b_windows = [w for i, w in map(ld.sample, range(8 * steps)) if i == 1]
    first, second = b_windows[:n_b], b_windows[n_b : 2 * n_b]
    assert sorted(first) == sorted(second) == list(range(n_b)) and first != second


def test_mixed_run_logs_tokens_by_source_and_per_source_val_loss_and_resumes_bit_for_bit(
    tmp_path, two_sources
):
    a, b = two_sources
    common = [sources_override(a, b), "train.eval_interval=10", "train.eval_batches=2"]
    straight = tmp_path / "straight"
    Trainer(mixed_job(straight, "train.max_steps=40", *common)).fit()
    split = tmp_path / "split"
    Trainer(mixed_job(split, "train.max_steps=20", *common)).fit()
    resumed = Trainer(mixed_job(split, "train.max_steps=40", *common))
    assert resumed.step == 20
    resumed.fit()

    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("event") != "goodput"]  # timings, in every run
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    last = steps[-1]
    assert last["step"] == 40 and sum(last["tokens_by_source"].values()) == last["tokens"]
    ratio = last["tokens_by_source"]["a"] / last["tokens_by_source"]["b"]
    assert ratio == 3.0  # 6 a and 2 b windows in every global batch, so exactly 3:1
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    for r in evals:
        assert {"val_loss/a", "val_loss/b"} <= r.keys()
        # Weighted like training: 3 parts a, 1 part b.
        assert r["val_loss"] == pytest.approx((3 * r["val_loss/a"] + r["val_loss/b"]) / 4)
    assert evals[-1]["val_loss/a"] < evals[0]["val_loss/a"]
    split_rows = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    # The resumed run records its longer train.max_steps as a config_change event row; the
    # step and eval rows must be the uninterrupted run's, bit for bit.
    events = [r for r in split_rows if "event" in r and r["event"] != "goodput"]
    assert [(e["event"], e["key"], e["old"], e["new"]) for e in events] == [
        ("config_change", "train.max_steps", 20, 40)
    ]
    split_rows = [r for r in split_rows if "event" not in r]
    assert [untimed(r) for r in split_rows] == [untimed(r) for r in rows]  # bit for bit


def test_exhaust_stop_ends_the_run_cleanly_before_the_smallest_source_repeats(
    tmp_path, two_sources
):
    a, _ = two_sources
    b = write_range_shards(tmp_path / "small", SPLIT, 512, docs=20, seed=3)
    extra = [sources_override(a, b, 1, 1), "data.exhaust=stop", "checkpoint.interval=0"]
    run = tmp_path / "run"
    t = Trainer(mixed_job(run, "train.max_steps=1000", *extra))
    n_b = int(t.loader.sizes[1])  # 4 samples of b per global batch of 8 at 1:1
    t.fit()
    assert t.step == n_b // 4 and "source 'b'" in t.stop_reason
    assert t.ckpt.latest().name == f"step_{n_b // 4:08d}"  # the final save
    again = Trainer(mixed_job(run, "train.max_steps=1000", *extra))
    again.fit()  # the same command again: nothing left, a clean stop at once
    assert again.step == n_b // 4 and again.stop_reason == t.stop_reason


def test_sources_made_by_different_tokenizers_are_refused_naming_both(tmp_path, opt_tokenizer_dir):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(
            json.dumps({"text": f"Document number {i} of a tiny corpus.", "id": str(i), "meta": {}})
            + "\n"
            for i in range(20)
        )
    )
    for name, path in (("gpt2", None), ("opt", str(opt_tokenizer_dir))):
        tokenize(
            TokenizeConfig(
                input=str(docs),
                output=str(tmp_path / name),
                tokenizer=TokenizerConfig(name=name, path=path),
            )
        )
    cfg = make_config(
        f"data.sources=[{{name:web,path:'{tmp_path / 'gpt2'}'}},"
        f"{{name:reddit,path:'{tmp_path / 'opt'}'}}]",
        "data.seq_len=16",
    )
    with pytest.raises(ValueError) as e:
        open_sources(cfg.data)
    msg = str(e.value)
    gpt2 = json.loads((tmp_path / "gpt2" / "manifest.json").read_text())["tokenizer"]["files"]
    opt = json.loads((tmp_path / "opt" / "manifest.json").read_text())["tokenizer"]["files"]
    assert "'reddit'" in msg and "'web'" in msg and "'gpt2'" in msg and "'opt'" in msg
    assert gpt2["vocab.bpe"] in msg and opt["merges.txt"] in msg
    # The same tokenizer in two places is one tokenizer.
    same = make_config(
        f"data.sources=[{{name:x,path:'{tmp_path / 'opt'}'}},{{name:y,path:'{tmp_path / 'opt'}'}}]",
        "data.seq_len=16",
    )
    assert [s.name for s in open_sources(same.data)] == ["x", "y"]


def test_mixture_config_errors_name_the_key(two_sources):
    a, b = two_sources
    with pytest.raises(ValueError, match="data.path and data.sources"):
        make_config(f"data.path={a}", sources_override(a, b))
    with pytest.raises(ValueError, match="weight of 'a'"):
        make_config(sources_override(a, b, wa=0))
    with pytest.raises(ValueError, match="data.exhaust"):
        make_config("data.exhaust=never")
    with pytest.raises(ValueError, match="weight of 'b' must be a positive number or 'prop"):
        make_config(sources_override(a, b, wa="proportional", wb="proportionate"))
    with pytest.raises(ValueError, match=r"weight 'proportional' on \['a'\] but numbers on"):
        make_config(sources_override(a, b, wa="proportional", wb=2))


def test_proportional_weights_draw_each_source_in_proportion_to_its_train_tokens(two_sources):
    """weight: proportional makes each weight its manifest's train token count, and the
    layout (deterministic) then holds every prefix of n samples to within one sample of n x
    its integer share, which is within 1 / MAX_PERIOD of the exact token share."""
    a, b = two_sources
    cfg = make_config(sources_override(a, b, wa="proportional", wb="proportional"))
    sources = open_sources(cfg.data)
    tokens = [read_manifest(p)["splits"]["train"]["num_tokens"] for p in (a, b)]
    assert [s.weight for s in sources] == tokens
    loader = GlobalOrderLoader(sources, 0, 8, 2, 0, 1)
    from_a = [int((batch.max(axis=1) < SPLIT).sum()) for batch in global_batches([loader], 300)]
    share = tokens[0] / sum(tokens)
    for steps in (1, 10, 100, 300):
        n = 8 * steps
        assert abs(sum(from_a[:steps]) - n * share) <= 1 + n / MAX_PERIOD, steps


@pytest.mark.slow
@pytest.mark.multirank
def test_same_mixture_on_one_process_and_two_fsdp_ranks_gives_the_same_losses(
    tmp_path, two_sources
):
    a, b = two_sources
    common = [
        sources_override(a, b),
        *TINY_RUN,
        "train.eval_interval=3",
        "train.eval_batches=2",
        "train.max_steps=6",
        "precision=fp32",
        "checkpoint.interval=0",
    ]

    def launch(nproc: int, run_dir: Path) -> list[dict]:
        train_on_ranks(nproc, [f"run_dir={run_dir}", *common])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r.get("event") != "goodput"]  # timings, in every run

    one, two = launch(1, tmp_path / "one"), launch(2, tmp_path / "two")
    keys = ("loss", "val_loss", "val_loss/a", "val_loss/b")
    assert len(one) == len(two) == 8  # 6 step rows, 2 eval rows
    assert [r1.keys() & keys for r1 in one] == [
        {"val_loss", "val_loss/a", "val_loss/b"} if "val_loss" in r1 else {"loss"} for r1 in one
    ]
    for r1, r2 in zip(one, two, strict=True):
        assert r1.get("tokens_by_source") == r2.get("tokens_by_source")
        assert r1.keys() & keys == r2.keys() & keys, r1["step"]
        for k in r1.keys() & keys:
            # fp32 reductions split across ranks sum in another order: a few fp32 roundings
            # (2^-24 = 6e-8) per step; measured at most 7.7e-8 over these 6 steps, eval rows equal.
            assert r2[k] == pytest.approx(r1[k], rel=1e-6), (r1["step"], k)


def test_rows_are_flattened_for_scalar_sinks():
    row = {"step": 3, "loss": 1.5, "tokens_by_source": {"a": 768, "b": 256}}
    assert flat_row(row) == {
        "step": 3,
        "loss": 1.5,
        "tokens_by_source/a": 768,
        "tokens_by_source/b": 256,
    }
