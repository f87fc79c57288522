"""The bulk-bits CPU dropout (opt_train/model/dropout.py): F.dropout's semantics (rate, scale, one
generator) at a fraction of its cost."""

from __future__ import annotations

import math

import pytest
import torch

from opt_train.model.dropout import dropout, dropout_mask, keep_threshold

N = 1 << 22  # elements per mask in the rate tests


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p_in_each_of_the_four_lanes_of_a_word(p):
    """Every 64-bit word feeds four consecutive elements; if a lane were biased (plain
    `random_()` on int64 leaves the top bit zero) every fourth element would be kept at
    another rate. Each lane has N/4 Bernoulli(1-p) draws: the observed rate lies within
    5 binomial standard deviations, plus the 2^-17 rounding of the keep probability to a
    multiple of 2^-16."""
    torch.manual_seed(0)
    kept = dropout_mask(torch.Size([N]), p, torch.float32) != 0
    bound = 5 * math.sqrt(p * (1 - p) / (N // 4)) + 2**-17
    for lane in range(4):
        rate = kept[lane::4].double().mean().item()
        assert abs(rate - (1 - p)) < bound, (lane, rate)
    assert abs(kept.double().mean().item() - (1 - p)) < bound / 2


def test_keep_probability_is_the_nearest_multiple_of_two_to_the_minus_16():
    threshold, keep_prob = keep_threshold(0.1)
    assert keep_prob == 58982 / 65536 and threshold == 58982 - 32768
    assert abs(keep_prob - 0.9) <= 2**-17
    assert keep_threshold(0.5) == (0, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_scaled_by_the_inverse_keep_probability_and_the_rest_zeroed(dtype):
    """As F.dropout: the scale is formed in the input's dtype (in bf16, 1/0.9 rounds to
    1.109375, exactly as F.dropout's `div_(1 - p)` of a bf16 mask does)."""
    torch.manual_seed(1)
    x = torch.rand(64, 128, dtype=dtype) + 1  # no zeros among the inputs
    y = dropout(x, 0.1)
    scale = torch.tensor(1 / keep_threshold(0.1)[1], dtype=dtype)
    kept = y != 0
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y[kept], x[kept] * scale)
    assert 0 < (~kept).sum() < x.numel()


def test_output_is_unbiased():
    """mean(mask) over N draws estimates 1 with std sqrt(p / (1 - p) / N) (the keep probability
    is exact in the scale, so there is no rounding term in fp32)."""
    torch.manual_seed(2)
    p = 0.3
    mean = dropout_mask(torch.Size([N]), p, torch.float32).double().mean().item()
    assert abs(mean - 1) < 5 * math.sqrt(p / (1 - p) / N)


def test_masks_come_from_torch_default_generator_so_a_seed_or_saved_state_replays_them():
    x = torch.ones(1000, 100)
    torch.manual_seed(3)
    a = dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1), a)
    state = torch.get_rng_state()  # what a checkpoint stores
    b = dropout(x, 0.1)
    assert not torch.equal(b, a)  # the generator moved on
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.1), b)


def test_mask_does_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    x = torch.ones(4, 12, 256, 256)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(4)
        one = dropout(x, 0.1)
        torch.set_num_threads(max(2, threads))
        torch.manual_seed(4)
        assert torch.equal(dropout(x, 0.1), one)
    finally:
        torch.set_num_threads(threads)


def test_backward_passes_gradients_through_the_same_mask():
    torch.manual_seed(5)
    x = (torch.rand(300, 70) + 1).requires_grad_()
    y = dropout(x, 0.2)
    g = torch.randn_like(y)
    y.backward(g)
    scale = 1 / keep_threshold(0.2)[1]
    assert torch.equal(x.grad, g * torch.where(y != 0, scale, 0.0))


def test_identity_in_eval_or_at_p_zero_everything_dropped_at_p_one_and_bad_p_refused():
    x = torch.randn(10, 10)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.5)
