import pytest
import torch

from opt_train.config import LossScaleConfig
from opt_train.precision import DynamicLossScaler, LossScaleTooSmall


def param_with_grad(values) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(len(values)))
    p.grad = torch.tensor(values, dtype=torch.float32)
    return p


def test_initial_scale_is_four():
    assert DynamicLossScaler(LossScaleConfig(), enabled=True).scale == 4.0


def test_overflow_is_detected_and_halves_the_scale():
    s = DynamicLossScaler(LossScaleConfig(), enabled=True)
    p = param_with_grad([1.0, float("inf")])
    assert s.found_overflow([p])
    s.update(True)
    assert s.scale == 2.0 and s.good_steps == 0


def test_gradients_are_unscaled_in_place():
    s = DynamicLossScaler(LossScaleConfig(), enabled=True)
    p = param_with_grad([4.0, -8.0])
    assert not s.found_overflow([p])
    assert torch.equal(p.grad, torch.tensor([1.0, -2.0]))


def test_scale_doubles_after_256_clean_steps_and_not_before():
    s = DynamicLossScaler(LossScaleConfig(), enabled=True)
    for _ in range(255):
        s.update(False)
    assert s.scale == 4.0
    s.update(False)
    assert s.scale == 8.0 and s.good_steps == 0


def test_overflow_restarts_the_growth_window():
    s = DynamicLossScaler(LossScaleConfig(), enabled=True)
    for _ in range(200):
        s.update(False)
    s.update(True)
    for _ in range(255):
        s.update(False)
    assert s.scale == 2.0
    s.update(False)
    assert s.scale == 4.0


def test_run_stops_when_scale_falls_below_two_to_minus_five():
    s = DynamicLossScaler(LossScaleConfig(), enabled=True)
    # 4 -> 2 -> 1 -> 0.5 -> 0.25 -> 0.125 -> 0.0625 -> 0.03125 (= 2^-5, still allowed)
    for _ in range(7):
        s.update(True)
    assert s.scale == 2.0**-5
    with pytest.raises(LossScaleTooSmall, match="below loss_scale.min"):
        s.update(True)


def test_state_round_trips():
    a = DynamicLossScaler(LossScaleConfig(), enabled=True)
    a.update(True)
    for _ in range(17):
        a.update(False)
    b = DynamicLossScaler(LossScaleConfig(), enabled=True)
    b.load_state_dict(a.state_dict())
    assert (b.scale, b.good_steps) == (2.0, 17)


def test_disabled_scaler_never_skips_or_scales():
    s = DynamicLossScaler(LossScaleConfig(), enabled=False)
    p = param_with_grad([float("nan")])
    assert s.scale == 1.0 and not s.found_overflow([p])
