import random

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from opt_train.config import ModelConfig
from opt_train.hf import load_hf, save_hf
from opt_train.model import OPT


def random_config(seed: int, pre_ln: bool) -> ModelConfig:
    """Shapes drawn at random, so parity holds for configs nobody wrote down."""
    r = random.Random(seed)
    heads = r.choice([1, 2, 4, 8])
    d = heads * r.choice([4, 8, 16])
    return ModelConfig(
        vocab_size=r.randrange(50, 300),
        n_layers=r.randint(1, 4),
        n_heads=heads,
        d_model=d,
        ffn_dim=r.choice([d, 2 * d, 4 * d, 3 * d + 5]),
        max_positions=r.choice([16, 40, 64]),
        word_embed_proj_dim=None if pre_ln else r.choice([d // 2, d, 2 * d]),
        pre_layer_norm=pre_ln,
        dropout=0.1,
        attention_dropout=0.1,
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the 0.006 init (and nonzero biases, LN), so differences would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# fp32 logits of O(1-10) through the same ops in another order: < 1e-4 absolute.
ATOL = 1e-4


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pre_ln", [True, False], ids=["pre-LN", "350m-style"])
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, seed, pre_ln):
    cfg = random_config(seed, pre_ln)
    ours = OPT(cfg)
    randomize(ours, seed)
    ours.eval()
    save_hf(ours, cfg, tmp_path)
    hf = OPTForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_positions))
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < ATOL


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pre_ln", [True, False], ids=["pre-LN", "350m-style"])
def test_load_hf_matches_transformers_logits(seed, pre_ln):
    cfg = random_config(100 + seed, pre_ln)
    hf_cfg = OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        ffn_dim=cfg.ffn,
        num_attention_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_positions,
        do_layer_norm_before=pre_ln,
        word_embed_proj_dim=cfg.embed_dim,
    )
    hf = OPTForCausalLM(hf_cfg)
    randomize(hf, seed)
    hf.tie_weights()
    hf.eval()
    ours, ours_cfg = load_hf(hf)
    assert ours_cfg.pre_layer_norm == pre_ln and ours_cfg.embed_dim == cfg.embed_dim
    x = torch.randint(0, cfg.vocab_size, (3, cfg.max_positions))
    with torch.no_grad():
        diff = (ours.eval()(x) - hf(x).logits).abs().max().item()
    assert diff < ATOL


def test_round_trip_through_a_directory_is_exact(tmp_path):
    cfg = random_config(7, True)
    ours = OPT(cfg)
    randomize(ours, 7)
    save_hf(ours, cfg, tmp_path)
    back, back_cfg = load_hf(tmp_path)
    assert back_cfg.n_layers == cfg.n_layers and back_cfg.ffn == cfg.ffn
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
