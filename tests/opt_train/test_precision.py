import dataclasses
import json
import logging

import pytest
import torch

import opt_train.engine.precision as precision_mod
from opt_train.checkpoint.resume_guard import ResumeRefused, check_resume
from opt_train.config import LossScaleConfig
from opt_train.engine.precision import (
    DeviceCaps,
    DynamicLossScaler,
    LossScaleTooSmall,
    autocast,
    choose_precision,
    device_caps,
)
from opt_train.train import flops
from opt_train.train.callbacks.console import header_lines
from tests.opt_train.conftest import make_config, small_job


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


# -- precision: auto ---------------------------------------------------------------------------

AVX2 = DeviceCaps("cpu", arch="x86_64", aten_isa="AVX2", avx2=True)
ZEN4 = DeviceCaps("cpu", arch="x86_64", aten_isa="AVX512", avx2=True, avx512_bf16=True)
SAPPHIRE_RAPIDS = DeviceCaps(
    "cpu", arch="x86_64", aten_isa="AVX512", avx2=True, avx512_bf16=True, amx_bf16=True
)
GRAVITON3 = DeviceCaps("cpu", arch="aarch64", aten_isa="SVE256", arm_bf16=True)
GRAVITON2 = DeviceCaps("cpu", arch="aarch64", aten_isa="DEFAULT")
A100 = DeviceCaps("cuda", cuda_bf16=True, cuda_name="NVIDIA A100-SXM4-80GB")
V100 = DeviceCaps("cuda", cuda_bf16=False, cuda_name="Tesla V100-SXM2-32GB")


@pytest.mark.parametrize(
    ("caps", "chosen", "why"),
    [
        (AVX2, "fp32", "this CPU has AVX2 but no AVX512-BF16/AMX"),
        (ZEN4, "bf16", "this CPU has AVX512-BF16"),
        (SAPPHIRE_RAPIDS, "bf16", "this CPU has AMX"),
        (GRAVITON3, "bf16", "this Arm CPU has the BF16 extension"),
        (GRAVITON2, "fp32", "this Arm CPU has no BF16 extension"),
        (A100, "bf16", "NVIDIA A100-SXM4-80GB has native bf16"),
        (V100, "fp32", "Tesla V100-SXM2-32GB has no native bf16"),
    ],
)
def test_auto_is_bf16_only_where_the_device_runs_bf16_matmuls_natively(caps, chosen, why):
    r = choose_precision("auto", caps)
    assert (r.requested, r.precision, r.warning) == ("auto", chosen, None)
    assert r.reason.startswith(f"auto: {why}")


def test_capping_onednn_or_aten_below_avx512_bf16_makes_auto_fp32():
    # ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 on a CPU that has the instructions.
    capped = dataclasses.replace(SAPPHIRE_RAPIDS, onednn_max_isa="AVX2")
    assert choose_precision("auto", capped).precision == "fp32"
    assert "oneDNN is capped at AVX2" in choose_precision("auto", capped).reason
    aten = dataclasses.replace(ZEN4, aten_isa="AVX2")
    assert choose_precision("auto", aten).precision == "fp32"
    allowed = dataclasses.replace(ZEN4, onednn_max_isa="avx512_core_bf16")
    assert choose_precision("auto", allowed).precision == "bf16"


def test_device_caps_reads_the_onednn_cap_from_the_environment(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    caps = device_caps(torch.device("cpu"))
    assert caps.onednn_max_isa == "AVX2" and caps.device_type == "cpu"
    assert caps.aten_isa == torch.backends.cpu.get_cpu_capability()
    assert choose_precision("auto", caps).precision == "fp32"  # whatever this CPU has


def test_header_line_names_the_precision_and_why():
    assert choose_precision("auto", AVX2).line() == (
        "precision fp32 (auto: this CPU has AVX2 but no AVX512-BF16/AMX, where bf16 matmuls "
        "are emulated, 50-150x slower than fp32)"
    )
    assert choose_precision("fp16", A100).line() == "precision fp16 (as configured)"


@pytest.mark.parametrize("caps", [AVX2, GRAVITON2, V100])
def test_explicit_bf16_is_honoured_with_a_warning_where_it_is_slow(caps):
    r = choose_precision("bf16", caps)
    assert r.precision == "bf16"
    assert r.warning.startswith("precision=bf16 is slow here: ")
    assert r.warning.endswith("precision=auto (or fp32) runs at full speed")
    for fast in (ZEN4, SAPPHIRE_RAPIDS, GRAVITON3, A100):
        assert choose_precision("bf16", fast).warning is None
    assert choose_precision("fp32", caps).warning is None


def test_auto_never_reaches_autocast():
    with pytest.raises(ValueError, match="got 'auto'"):
        autocast("auto", "cpu")


def test_the_cpu_peak_probe_is_small_for_emulated_bf16_and_leaves_the_global_rng(monkeypatch):
    sizes = []
    real = flops.cpu_matmul_rate
    monkeypatch.setattr(
        flops, "cpu_matmul_rate", lambda d, n: sizes.append((d, n)) or real(d, n, 0.01)
    )
    before = torch.get_rng_state()
    monkeypatch.setattr(flops, "device_caps", lambda device: AVX2)
    flops.device_peak_flops(torch.device("cpu"), "bf16", None)
    flops.device_peak_flops(torch.device("cpu"), "fp32", None)
    monkeypatch.setattr(flops, "device_caps", lambda device: ZEN4)
    flops.device_peak_flops(torch.device("cpu"), "bf16", None)
    assert sizes == [(torch.bfloat16, 256), (torch.float32, 1024), (torch.bfloat16, 1024)]
    assert torch.equal(torch.get_rng_state(), before)


def test_the_planner_plans_auto_as_bf16_on_gpus():
    from opt_train.tools.plan import PlannerConfig, make_plan

    job = make_config("precision=auto", "+model=opt-1.3b")
    bf16 = make_config("precision=bf16", "+model=opt-1.3b")
    assert make_plan(job, PlannerConfig()).as_dict() == make_plan(bf16, PlannerConfig()).as_dict()
    assert make_plan(job, PlannerConfig()).precision == "bf16"


# -- the trainer and the resume guard ----------------------------------------------------------


def _trainer(run_dir, data, *extra):
    from opt_train.train.trainer import Trainer

    return Trainer(small_job(run_dir, data, *extra))


def test_auto_resolving_differently_on_resume_is_accepted_and_logged(
    tmp_path, small_shards, monkeypatch, caplog
):
    run_dir = tmp_path / "run"
    # Written "on a machine with AVX512-BF16": auto is bf16 there.
    monkeypatch.setattr(precision_mod, "device_caps", lambda device: ZEN4)
    t = _trainer(run_dir, small_shards, "precision=auto", "train.max_steps=2")
    assert (t.cfg.precision, t.precision.precision) == ("bf16", "bf16")
    assert t.engine.autocast_precision == "bf16"
    t.fit()
    t.close()
    assert "precision: auto" in (run_dir / "config.yaml").read_text()  # auto, not bf16
    # Resumed "here" (AVX2 only): auto is fp32; not a config change, and the log says so.
    monkeypatch.setattr(precision_mod, "device_caps", lambda device: AVX2)
    with caplog.at_level(logging.WARNING, logger="opt_train.checkpoint.resume_guard"):
        t = _trainer(run_dir, small_shards, "precision=auto", "train.max_steps=3")
    assert t.resumed_step == 2
    assert [e["key"] for e in t.config_changes] == ["train.max_steps"]  # precision is none
    assert t.engine.autocast_precision == "fp32" and t.cfg.precision == "fp32"
    assert "precision auto resolved to fp32 here, bf16 when the checkpoint was written" in (
        caplog.text
    )
    assert header_lines(t)[3] == choose_precision("auto", AVX2).line()
    t.fit()
    t.close()
    state = json.loads(next((run_dir / "checkpoints").glob("step_*3/state.json")).read_text())
    assert state["precision"] == "fp32"


def test_explicit_bf16_on_a_slow_cpu_warns_once_at_start(
    tmp_path, small_shards, monkeypatch, caplog
):
    monkeypatch.setattr(precision_mod, "device_caps", lambda device: AVX2)
    with caplog.at_level(logging.WARNING, logger="opt_train.train.trainer"):
        t = _trainer(tmp_path / "run", small_shards, "precision=bf16")
    t.close()
    assert t.engine.autocast_precision == "bf16"
    warnings = [r.message for r in caplog.records if "precision=bf16 is slow here" in r.message]
    assert len(warnings) == 1 and "AVX2 but no AVX512-BF16/AMX" in warnings[0]


def _checkpoint(path, precision: str, resolved: str):
    """A checkpoint's three files the resume guard reads, as the trainer writes them."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"precision: {precision}\n")
    (path / "meta.json").write_text(json.dumps({"step": 7}))
    (path / "state.json").write_text(json.dumps({"step": 7, "precision": resolved}))
    return path


def test_explicit_to_auto_compares_what_auto_resolves_to(tmp_path):
    ckpt = _checkpoint(tmp_path / "bf16", "bf16", "bf16")
    assert check_resume(ckpt, "precision: auto\n", [], "bf16") == []  # the same numbers
    with pytest.raises(ResumeRefused, match=r"precision: 'bf16' -> 'auto \(fp32 here\)'"):
        check_resume(ckpt, "precision: auto\n", [], "fp32")
    [event] = check_resume(ckpt, "precision: auto\n", ["precision"], "fp32")
    assert (event["old"], event["new"]) == ("bf16", "auto (fp32 here)")
    ckpt = _checkpoint(tmp_path / "auto", "auto", "bf16")
    assert check_resume(ckpt, "precision: bf16\n", [], "bf16") == []
    with pytest.raises(ResumeRefused, match=r"precision: 'auto \(bf16 then\)' -> 'fp32'"):
        check_resume(ckpt, "precision: fp32\n", [], "fp32")


def test_an_explicit_precision_change_stays_guarded(tmp_path):
    ckpt = _checkpoint(tmp_path / "bf16", "bf16", "bf16")
    with pytest.raises(ResumeRefused, match=r"precision: 'bf16' -> 'fp32'"):
        check_resume(ckpt, "precision: fp32\n", [], "fp32")
