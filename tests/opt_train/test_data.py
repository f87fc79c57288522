import numpy as np
import pytest

from data_pipeline.shards import SplitReader
from opt_train.data import GlobalOrderLoader, PackedWindows, validation_batches


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


def test_validation_batches_are_fixed_and_split_across_ranks(small_shards):
    w = PackedWindows(small_shards, "validation", 32)
    single = validation_batches(w, 2, 2)
    halves = [validation_batches(w, 2, 2, rank=r, world=2) for r in range(2)]
    assert sum(len(x) for x, _ in single) == 4
    ranks_rows = sorted(tuple(r) for h in halves for x, _ in h for r in x.numpy())
    assert len(ranks_rows) == 8
