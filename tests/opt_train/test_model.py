"""The plain OPT module: each test checks one fact of OPT's architecture or of forward's contract."""

import math

import pytest
import torch

from opt_train.config import ModelConfig
from opt_train.model.opt import OPT

TINY = dict(d_model=32, n_heads=4, vocab_size=64, dropout=0.0, attention_dropout=0.0)


def test_vocab_default_is_opts_50265_padded_to_a_multiple_of_8():
    cfg = ModelConfig()
    assert cfg.vocab_size == 50272 and cfg.vocab_size % 8 == 0 and cfg.vocab_size - 50265 < 8


def test_positions_start_at_row_two_of_2_plus_max_positions_rows():
    torch.manual_seed(0)
    m = OPT(ModelConfig(max_positions=64, **TINY)).eval()
    assert m.embed_positions.weight.shape[0] == 66
    x = torch.randint(0, 64, (1, 5))
    before = m(x)
    with torch.no_grad():
        m.embed_positions.weight[:2] = 100.0  # the reserved rows: never read
    assert torch.equal(m(x), before)
    with torch.no_grad():
        m.embed_positions.weight[2] += 1.0  # the first token's position
    assert not torch.equal(m(x)[0, 0], before[0, 0])


def test_logits_are_the_hidden_states_through_the_tied_token_embedding():
    m = OPT(ModelConfig(**TINY)).eval()
    x = torch.randint(0, 64, (2, 5))
    logits = m(x)
    assert logits.shape == (2, 5, 64)
    assert torch.equal(logits, m.hidden_states(x) @ m.embed_tokens.weight.t())
    assert "lm_head.weight" not in dict(m.named_parameters())


def test_a_head_receives_the_hidden_states_and_the_tied_weight_instead_of_logits():
    m = OPT(ModelConfig(**TINY)).eval()
    x = torch.randint(0, 64, (2, 5))
    seen = {}

    def head(hidden, weight):
        seen["hidden"], seen["weight"] = hidden, weight
        return hidden.sum()

    out = m(x, head=head)
    assert seen["weight"] is m.embed_tokens.weight
    assert torch.equal(seen["hidden"], m.hidden_states(x))
    assert torch.equal(out, seen["hidden"].sum())


def test_350m_layout_has_projections_without_bias_and_no_final_layer_norm():
    m = OPT(ModelConfig(d_model=64, n_heads=4, word_embed_proj_dim=32, pre_layer_norm=False))
    assert m.final_layer_norm is None
    assert m.project_in.weight.shape == (64, 32) and m.project_in.bias is None
    assert m.project_out.weight.shape == (32, 64) and m.project_out.bias is None
    assert m.embed_tokens.weight.shape[1] == 32


def test_init_statistics_match_opt():
    """normal(0, 0.006); attention-out and fc2 scaled by 1/sqrt(2L); biases zero; LN weight 1."""
    layers = 4
    cfg = ModelConfig(n_layers=layers, d_model=256, n_heads=4, vocab_size=4096)
    m = OPT(cfg)
    out_std = 0.006 / math.sqrt(2 * layers)
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "layer_norm" in name:
            assert torch.all(p == 1.0), name
        else:
            want = out_std if name.endswith(("out_proj.weight", "fc2.weight")) else 0.006
            # A sample std of n normal draws has relative standard error 1/sqrt(2n): 5 sigma.
            rel = 5 / math.sqrt(2 * p.numel())
            assert p.float().std().item() == pytest.approx(want, rel=rel), name
            assert abs(p.float().mean().item()) < 4 * want / math.sqrt(p.numel()), name


def test_causal_attention_ignores_future_tokens():
    torch.manual_seed(0)
    m = OPT(ModelConfig(**TINY)).eval()
    x = torch.randint(0, 64, (1, 10))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 64
    assert torch.allclose(m(x)[0, :7], m(y)[0, :7], atol=1e-6)


def test_dropout_config_reaches_every_layer():
    cfg = ModelConfig(**{**TINY, "n_layers": 3, "dropout": 0.3, "attention_dropout": 0.2})
    m = OPT(cfg)
    assert all(layer.dropout == 0.3 for layer in m.layers)
    assert all(layer.self_attn.dropout == 0.2 for layer in m.layers)


def test_dropout_draws_new_masks_in_train_mode_and_none_in_eval():
    m = OPT(ModelConfig(**{**TINY, "dropout": 0.3, "attention_dropout": 0.2}))
    x = torch.randint(0, 64, (2, 8))
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))
