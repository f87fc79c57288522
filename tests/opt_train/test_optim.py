import pytest

from opt_train.config import ModelConfig, OptimConfig
from opt_train.engine.optim import LinearWarmupDecay, build_optimizer, param_groups
from opt_train.model.opt import OPT

OPT_SCHEDULE = OptimConfig(lr=6e-4, warmup_tokens=375_000_000, decay_tokens=300_000_000_000)
BATCH = 524_288  # OPT-125m: 0.5M tokens per step


def test_lr_is_peak_at_end_of_375m_token_warmup():
    s = LinearWarmupDecay(OPT_SCHEDULE, BATCH)
    assert s.warmup_steps == 716  # ceil(375e6 / 524288)
    assert s(s.warmup_steps) == pytest.approx(6e-4)
    assert s(s.warmup_steps // 2) == pytest.approx(6e-4 * (s.warmup_steps // 2) / s.warmup_steps)
    assert s(1) == pytest.approx(6e-4 / 716)


def test_lr_mid_decay_is_halfway_between_peak_and_ten_percent():
    s = LinearWarmupDecay(OPT_SCHEDULE, BATCH)
    mid = (s.warmup_steps + s.decay_steps) / 2
    lo, hi = int(mid), int(mid) + 1

    def want(step: int) -> float:
        frac = (step - s.warmup_steps) / (s.decay_steps - s.warmup_steps)
        return 6e-4 + frac * (6e-5 - 6e-4)

    assert s(lo) == pytest.approx(want(lo))
    assert (s(lo) + s(hi)) / 2 == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-5)


def test_lr_ends_at_ten_percent_at_300b_tokens_and_stays():
    s = LinearWarmupDecay(OPT_SCHEDULE, BATCH)
    assert s.decay_steps == 572_205  # ceil(300e9 / 524288)
    assert s(s.decay_steps) == pytest.approx(6e-5)
    assert s(s.decay_steps + 10_000) == pytest.approx(6e-5)
    assert s(s.decay_steps - 1) > 6e-5


def test_adamw_uses_opt_betas_eps_and_weight_decay():
    m = OPT(ModelConfig(d_model=32, n_heads=4, vocab_size=64))
    opt = build_optimizer(m, OptimConfig())
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["weight_decay"] == 0.1


def test_weight_decay_skips_biases_and_layernorm_unless_all():
    m = OPT(ModelConfig(d_model=32, n_heads=4, vocab_size=64))
    decayed = {id(p) for p in param_groups(m, OptimConfig())[0]["params"]}
    for name, p in m.named_parameters():
        excluded = name.endswith("bias") or "layer_norm" in name
        assert (id(p) in decayed) != excluded, name
    groups = param_groups(m, OptimConfig(weight_decay_on="all"))
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(m.parameters()))


def test_unknown_weight_decay_rule_is_rejected():
    with pytest.raises(ValueError, match="weight_decay_on"):
        OptimConfig(weight_decay_on="biases")


def test_clip_grad_norm_default_is_one():
    assert OptimConfig().clip_grad_norm == 1.0
