"""The bulk-bits CPU dropout (opt_train/dropout.py) and the written-out attention that uses it:
F.dropout's semantics (rate, scale, one generator) at a fraction of its cost."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from opt_train.config import ModelConfig
from opt_train.dropout import dropout, dropout_mask, keep_threshold, uses_bulk_dropout
from opt_train.model import OPT, causal_attention_with_dropout
from opt_train.parallelize import apply_ac

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


def test_only_plain_cpu_tensors_take_the_bulk_path():
    assert uses_bulk_dropout(torch.ones(2))
    assert not uses_bulk_dropout(torch.ones(2, device="meta"))


# -- attention written out ----------------------------------------------------------------------


def qkv(dtype=torch.float32, b=2, h=3, t=17, hd=8):
    g = torch.Generator().manual_seed(6)
    return [torch.randn(b, h, t, hd, generator=g, dtype=dtype) for _ in range(3)]


def sdpa_probabilities(q, k):
    """SDPA's own attention probabilities: its output when the values are the identity."""
    t = q.shape[-2]
    eye = torch.eye(t, dtype=q.dtype).expand(*q.shape[:2], t, t)
    return F.scaled_dot_product_attention(q, k, eye, is_causal=True)


def test_attention_is_sdpa_attention_with_its_probabilities_dropped_by_the_mask():
    q, k, v = qkv()
    torch.manual_seed(7)
    got = causal_attention_with_dropout(q, k, v, 0.1)
    torch.manual_seed(7)
    mask = dropout_mask(torch.Size([*q.shape[:2], q.shape[2], q.shape[2]]), 0.1, q.dtype)
    want = (sdpa_probabilities(q, k) * mask) @ v
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # fp32 rounding of sums


def test_attention_without_dropout_equals_causal_sdpa():
    q, k, v = qkv()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention_with_dropout(q, k, v, 0.0), want)


def test_bf16_attention_is_as_close_to_fp32_as_sdpa_in_bf16():
    """Under bf16 the written-out path rounds scores and probabilities to bf16 (HF's eager OPT
    attention does the same); its error against fp32 is of the order of SDPA's own in bf16."""
    q, k, v = qkv(t=64, hd=64)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    low = [t.bfloat16() for t in (q, k, v)]
    ours = (causal_attention_with_dropout(*low, 0.0).float() - exact).abs().max()
    sdpa = (F.scaled_dot_product_attention(*low, is_causal=True).float() - exact).abs().max()
    assert ours < 3 * sdpa + 1e-3


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_replays_attention_and_residual_dropout_masks(mode):
    cfg = ModelConfig(
        vocab_size=128, d_model=32, n_heads=4, n_layers=2, dropout=0.1, attention_dropout=0.1
    )
    torch.manual_seed(0)
    plain, ckpt = OPT(cfg), OPT(cfg)
    ckpt.load_state_dict(plain.state_dict())
    apply_ac(ckpt, mode)
    x = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (want_loss, want), (got_loss, got) = results
    assert torch.equal(got_loss, want_loss)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_training_step_uses_the_bulk_path_for_attention_dropout():
    """The model in train mode on CPU goes through the written-out attention: its output is
    the one the same seed gives through causal_attention_with_dropout directly."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=1, dropout=0.0)
    attn = OPT(cfg).layers[0].self_attn
    x = torch.randn(2, 9, 32)
    q, k, v = (
        proj(x).view(2, 9, 4, 8).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    torch.manual_seed(8)
    y = causal_attention_with_dropout(q, k, v, cfg.attention_dropout)
    want = attn.out_proj(y.transpose(1, 2).reshape(2, 9, 32))
    torch.manual_seed(8)
    torch.testing.assert_close(attn(x), want, rtol=0, atol=0)
