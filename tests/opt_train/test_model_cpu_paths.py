"""The model's CPU training paths that differ from its GPU/DTensor ones: attention with dropout
written out (instead of SDPA's math path) and the sparse gradient of the tied embedding lookup.
Each must compute what the general path computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opt_train.config import ModelConfig
from opt_train.engine.loss import chunked_cross_entropy, lm_loss
from opt_train.model.dropout import dropout_mask
from opt_train.model.opt import OPT, causal_attention_with_dropout
from opt_train.parallel.apply import apply_ac


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
# attention_dropout 0.1 takes the written-out attention; 0.0 takes SDPA's CPU kernel, whose
# output selective checkpointing saves rather than recomputes.
@pytest.mark.parametrize("attention_dropout", [0.1, 0.0])
def test_activation_checkpointing_replays_attention_and_residual_dropout_masks(
    mode, attention_dropout
):
    cfg = ModelConfig(
        vocab_size=128,
        d_model=32,
        n_heads=4,
        n_layers=2,
        dropout=0.1,
        attention_dropout=attention_dropout,
    )
    torch.manual_seed(0)
    plain, ckpt = OPT(cfg), OPT(cfg)
    ckpt.load_state_dict(plain.state_dict())
    apply_ac(ckpt, mode)
    x = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(5)
        loss = lm_loss(model, x[:, :-1], x[:, 1:])
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


def test_tied_embedding_gradient_is_dense_and_equals_the_dense_lookup_path():
    """For a batch of fewer tokens than vocabulary rows the lookup's gradient is sparse and added
    into the loss's dense one: the sum is the one the dense lookup gives up to fp32 rounding of
    the order of addition (|grad| < 0.1)."""
    cfg = ModelConfig(
        vocab_size=512, d_model=64, n_heads=4, n_layers=2, dropout=0.0, attention_dropout=0.0
    )
    torch.manual_seed(0)
    model = OPT(cfg)
    x = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(1))
    assert model.embed(x, tied_output=True).grad_fn._saved_sparse
    assert not model.embed(x, tied_output=False).grad_fn._saved_sparse
    # More tokens than vocabulary rows: the sparse values would outweigh the dense gradient.
    assert not model.embed(torch.zeros(8, 65, dtype=torch.long), True).grad_fn._saved_sparse
    lm_loss(model, x[:, :-1], x[:, 1:]).backward()
    fast = model.embed_tokens.weight.grad.clone()
    assert fast.layout == torch.strided
    model.zero_grad()
    h = model.hidden_states(x[:, :-1])  # tied_output=False: nn.Embedding's dense gradient
    chunked_cross_entropy(
        h.reshape(-1, 64), model.embed_tokens.weight, x[:, 1:].reshape(-1)
    ).backward()
    dense = model.embed_tokens.weight.grad
    assert not torch.equal(dense, torch.zeros_like(dense))
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-8)
