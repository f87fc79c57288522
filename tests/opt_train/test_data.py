from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.shards import ShardWriter, SplitReader, iter_documents
from opt_train.config import ModelConfig
from opt_train.data.loader import GlobalOrderLoader, PackedWindows, validation_batches
from opt_train.engine.loss import lm_loss
from opt_train.model.opt import OPT
from tests.opt_train.conftest import SMALL_VOCAB


def all_rows(loader_factory, world: int, steps: int) -> list[np.ndarray]:
    """Global batches as seen by all ranks together, in rank order."""
    loaders = [loader_factory(r, world) for r in range(world)]
    out = []
    for _ in range(steps):
        rows = []
        for ld in loaders:
            for x, y in ld.next_step():
                rows.append(np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1))
        out.append(np.concatenate(rows))
    return out


def factory(shards, seed=0, micro=2, global_batch=8, seq=32):
    windows = PackedWindows(shards, "train", seq)
    return lambda r, w: GlobalOrderLoader(windows, seed, global_batch, micro, r, w)


def test_windows_are_seq_plus_one_tokens_overlapping_by_one(small_shards):
    w = PackedWindows(small_shards, "train", 32)
    stream = SplitReader(small_shards, "train").read(0, 65)
    assert np.array_equal(w.window(0), stream[:33]) and np.array_equal(w.window(1), stream[32:65])


def test_targets_are_inputs_shifted_by_one(small_shards):
    ld = factory(small_shards)(0, 1)
    for x, y in ld.next_step():
        assert np.array_equal(x.numpy()[:, 1:], y.numpy()[:, :-1])


def test_same_seed_same_order_other_seed_other_order(small_shards):
    a = all_rows(factory(small_shards, seed=3), 1, 3)
    b = all_rows(factory(small_shards, seed=3), 1, 3)
    c = all_rows(factory(small_shards, seed=4), 1, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("world", [2, 4])
def test_global_batches_do_not_depend_on_world_size(small_shards, world):
    one = all_rows(factory(small_shards), 1, 4)
    many = all_rows(factory(small_shards), world, 4)
    assert all(np.array_equal(x, y) for x, y in zip(one, many, strict=True))


def test_resume_continues_at_exactly_the_next_sample(small_shards):
    make = factory(small_shards)
    straight = all_rows(make, 1, 5)
    first = make(0, 1)
    for _ in range(2):
        first.next_step()
    resumed = make(0, 1)
    resumed.load_state_dict(first.state_dict())
    rest = [
        np.concatenate(
            [
                np.concatenate([x, y[:, -1:]], 1)
                for x, y in ((a.numpy(), b.numpy()) for a, b in resumed.next_step())
            ]
        )
        for _ in range(3)
    ]
    assert all(np.array_equal(x, y) for x, y in zip(straight[2:], rest, strict=True))


def test_epochs_reshuffle_and_cover_every_window(small_shards):
    windows = PackedWindows(small_shards, "train", 32)
    ld = GlobalOrderLoader(windows, 0, 1, 1)
    n = len(windows)
    first = [ld.sample_index(g) for g in range(n)]
    second = [ld.sample_index(g) for g in range(n, 2 * n)]
    assert sorted(first) == list(range(n)) == sorted(second) and first != second


def test_loader_refuses_state_from_other_data(small_shards):
    a = factory(small_shards, seq=32)(0, 1)
    b = factory(small_shards, seq=16)(0, 1)
    with pytest.raises(ValueError, match="seq_len"):
        b.load_state_dict(a.state_dict())


def rows_of(batches) -> list[tuple[int, ...]]:
    """Each window of `batches` as its seq_len + 1 tokens."""
    return [
        tuple(np.concatenate([r, t[-1:]]))
        for x, y in batches
        for r, t in zip(x.numpy(), y.numpy(), strict=True)
    ]


@pytest.fixture(scope="module")
def random_shards(tmp_path_factory) -> Path:
    """Uniformly random documents (every 33-token window is unique with overwhelming
    probability, unlike the patterned corpus, whose windows repeat across splits), every
    tenth one held out, over several shards per split."""
    rng = np.random.default_rng(0)
    tok = {"name": "synthetic", "vocab_size": 512, "eos_id": 0}
    path = tmp_path_factory.mktemp("random") / "shards"
    with ShardWriter(path, tok, max_shard_tokens=1500) as w:
        for i in range(300):
            w.add(
                rng.integers(1, 512, int(rng.integers(20, 120))),
                "validation" if i % 10 == 0 else "train",
            )
    return path


def test_validation_set_is_the_first_held_out_windows_and_never_a_training_window(random_shards):
    val = PackedWindows(random_shards, "validation", 32)
    train = PackedWindows(random_shards, "train", 32)
    stream = np.concatenate([np.append(d, 0) for d in iter_documents(random_shards, "validation")])
    batches = validation_batches(val, 2, 3)
    assert [x.shape for x, _ in batches] == [(2, 32)] * 3
    # Exactly windows 0..5 of the validation split, in stored order.
    assert rows_of(batches) == [tuple(stream[32 * j : 32 * j + 33]) for j in range(6)]
    assert rows_of(validation_batches(val, 2, 3)) == rows_of(batches)  # fixed across calls
    train_rows = {tuple(train.window(j)) for j in range(len(train))}
    assert not train_rows & set(rows_of(batches))


@pytest.mark.parametrize("world", [2, 3, 4, 5, 16])
def test_validation_set_and_its_mean_do_not_depend_on_world_size(small_shards, world):
    """The trainer's val_loss is the mean over ranks of each rank's mean batch loss; with
    equal batches and equal shares that is the one-process mean over the same windows."""
    val = PackedWindows(small_shards, "validation", 32)
    single = validation_batches(val, 4, 3)
    ranks = [validation_batches(val, 4, 3, rank=r, world=world) for r in range(world)]
    # A multiset: the same 12 windows, each the same number of times (5 and 16 ranks repeat
    # every window alike to give each rank equal batches), so none weighs more in the mean.
    covered = Counter(row for b in ranks for row in rows_of(b))
    assert covered.keys() == Counter(rows_of(single)).keys() and len(covered) == 12
    assert len(set(covered.values())) == 1, covered.values()
    assert len({len(b) for b in ranks}) == 1  # same number of forwards on every rank
    assert len({x.shape for b in ranks for x, _ in b}) == 1  # every batch weighs the same

    # The real loss of a real model, reduced as Trainer.evaluate reduces it. The loss is an
    # fp32 mean over each batch's tokens, and other groupings sum in another order: ~1e-7
    # relative (measured 5.7e-8 at 4 ranks), hence rel=1e-6.
    torch.manual_seed(0)
    model = OPT(ModelConfig(vocab_size=SMALL_VOCAB, d_model=32, n_heads=4, n_layers=1)).eval()

    def mean_over_ranks(per_rank) -> float:
        with torch.no_grad():
            return float(
                np.mean([np.mean([lm_loss(model, x, y).item() for x, y in b]) for b in per_rank])
            )

    got, want = mean_over_ranks(ranks), mean_over_ranks([single])
    assert got == pytest.approx(want, rel=1e-6)


def test_validation_set_smaller_than_asked_is_the_whole_split(small_shards):
    val = PackedWindows(small_shards, "validation", 32)
    n = len(val)
    got = [validation_batches(val, 4, 10_000, rank=r, world=2) for r in range(2)]
    assert sorted(row for b in got for row in rows_of(b)) == sorted(
        tuple(val.window(j)) for j in range(n)
    )
