"""Rank agreement: one collective tells every rank what any, all or each rank said."""

import pytest
import torch

from opt_train.parallel.process_groups import agree, all_ranks, any_rank, each_rank
from tests.multirank import spawn


def _agree_on_two_ranks(rank: int, world: int) -> None:
    # Rank 1 alone fails: every rank learns it, and that not all ranks succeeded.
    assert any_rank(rank == 1) is True
    assert any_rank(False) is False
    assert all_ranks(rank == 1) is False
    assert all_ranks(True) is True
    values = torch.tensor([float(rank), 10.0 * rank + 1])
    assert agree(values.clone(), "max").tolist() == [1.0, 11.0]
    assert agree(values.clone(), "min").tolist() == [0.0, 1.0]
    summed = agree(values, "sum")
    assert summed is values and values.tolist() == [1.0, 12.0]  # in place
    assert each_rank("" if rank == 0 else f"rank {rank}: disk full") == ["", "rank 1: disk full"]


@pytest.mark.multirank
def test_every_rank_learns_what_any_all_and_each_rank_said():
    spawn(_agree_on_two_ranks, 2)


def test_a_process_alone_agrees_with_itself_without_a_process_group():
    assert not torch.distributed.is_initialized()
    assert any_rank(True) and not any_rank(False)
    assert all_ranks(True) and not all_ranks(False)
    assert agree(torch.tensor([3.0]), "sum").item() == 3.0
    assert each_rank({"step": 7}) == [{"step": 7}]
