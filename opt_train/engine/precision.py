"""Mixed precision: what `precision: auto` resolves to, autocast per precision, and fp16's
dynamic loss scaler.

`auto` (the default) is bf16 where the device runs bf16 matmuls natively, else fp32: on a CPU
without AVX512-BF16, AMX or Arm's BF16 extension (AVX2-only x86: AMD Zen 3 and older, most
Intel client CPUs, many cloud VMs) torch's bf16 matmuls are emulated and run 50-150x slower
than fp32 (docs/benchmarks.md, "Numbers behind code comments", has the command), so a bf16
default would turn minutes into hours there. On a CUDA GPU without bf16
(before Ampere) auto is fp32 too, not fp16: fp16 needs loss scaling, whose skipped steps change
what is trained, and OPT's fp16 recipe is one a user should choose by name (`precision=fp16`).
The choice is a pure function of reported capabilities (`choose_precision`), so tests fake them.

bf16 and fp16 keep fp32 master weights (the parameters) and run matmuls in the low precision
under autocast. fp16 needs loss scaling; we follow metaseq: start at 4, double after 256 steps
without overflow, on overflow skip the step and halve, and stop when the scale falls below
2^-5 (at that point training has diverged and more halving only hides it).
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from opt_train.config import LossScaleConfig
from opt_train.model.dtypes import DTYPES
from opt_train.parallel.process_groups import agree, all_ranks


class LossScaleTooSmall(FloatingPointError):
    """The fp16 loss scale fell below its minimum: the run has diverged."""


# oneDNN's ISA caps in ascending order (DNNL_MAX_CPU_ISA / ONEDNN_MAX_CPU_ISA); bf16 dot
# products need AVX512_CORE_BF16 or above. Capping below it (e.g. DNNL_MAX_CPU_ISA=AVX2) leaves
# bf16 matmuls emulated even on a CPU that has the instructions.
ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
    "ALL",
)
# The ratio: docs/benchmarks.md, "Numbers behind code comments" (the command that measures it).
SLOW_BF16 = "where bf16 matmuls are emulated, 50-150x slower than fp32"


@dataclass(frozen=True)
class DeviceCaps:
    """What the device reports about low-precision matmuls; `device_caps` reads them."""

    device_type: str  # "cpu" | "cuda" | ...
    cuda_bf16: bool = False  # native (not emulated) bf16: compute capability 8.0 and up
    cuda_name: str = ""
    arch: str = ""  # platform.machine(): x86_64 | AMD64 | aarch64 | arm64
    aten_isa: str = ""  # torch.backends.cpu.get_cpu_capability(), after ATEN_CPU_CAPABILITY
    onednn_max_isa: str = ""  # DNNL_MAX_CPU_ISA / ONEDNN_MAX_CPU_ISA, "" when unset
    avx2: bool = False
    avx512_bf16: bool = False
    amx_bf16: bool = False
    arm_bf16: bool = False  # the 'bf16' feature of /proc/cpuinfo (Armv8.6 BF16: BFMMLA)


@dataclass(frozen=True)
class Resolved:
    """The precision a run computes in, and why, for the console header."""

    requested: str  # auto | bf16 | fp16 | fp32, as configured
    precision: str  # bf16 | fp16 | fp32
    reason: str
    warning: str | None = None  # an explicit choice this device runs slowly

    def line(self) -> str:
        return f"precision {self.precision} ({self.reason})"


def cpu_bf16(caps: DeviceCaps) -> tuple[bool, str]:
    """Whether this CPU runs bf16 matmuls natively, and what it has (or lacks) that says so."""
    if caps.arch in ("aarch64", "arm64"):
        if caps.arm_bf16:
            return True, "this Arm CPU has the BF16 extension"
        return False, f"this Arm CPU has no BF16 extension, {SLOW_BF16}"
    has = "AMX" if caps.amx_bf16 else "AVX512-BF16" if caps.avx512_bf16 else ""
    if not has:
        base = "AVX2" if caps.avx2 else caps.aten_isa or caps.arch or "this CPU"
        return False, f"this CPU has {base} but no AVX512-BF16/AMX, {SLOW_BF16}"
    isa = caps.onednn_max_isa.upper()
    if isa in ONEDNN_ISAS and ONEDNN_ISAS.index(isa) < ONEDNN_ISAS.index("AVX512_CORE_BF16"):
        return False, f"this CPU has {has} but oneDNN is capped at {isa}, {SLOW_BF16}"
    if not caps.aten_isa.upper().startswith("AVX512"):
        return False, f"this CPU has {has} but ATen runs at {caps.aten_isa}, {SLOW_BF16}"
    return True, f"this CPU has {has}"


def choose_precision(requested: str, caps: DeviceCaps) -> Resolved:
    """`requested` as the device should run it; a pure function of `caps`."""
    if caps.device_type == "cuda":
        native = caps.cuda_bf16
        why = f"{caps.cuda_name or 'this GPU'} {'has' if native else 'has no'} native bf16"
    elif caps.device_type == "cpu":
        native, why = cpu_bf16(caps)
    else:
        native, why = True, f"{caps.device_type} device"
    if requested == "auto":
        return Resolved("auto", "bf16" if native else "fp32", f"auto: {why}")
    warning = None
    if requested == "bf16" and not native:
        warning = f"precision=bf16 is slow here: {why}; precision=auto (or fp32) runs at full speed"
    return Resolved(requested, requested, "as configured", warning)


def device_caps(device: torch.device) -> DeviceCaps:
    """The capabilities `choose_precision` decides from, as torch (and the OS) report them."""
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation to exclude
            native = torch.cuda.is_bf16_supported()
        return DeviceCaps("cuda", cuda_bf16=native, cuda_name=torch.cuda.get_device_name(device))
    if device.type != "cpu":
        return DeviceCaps(device.type)
    # cpuinfo's flags as torch reads them (x86: avx2, avx512_bf16, amx_bf16, ...).
    flags = torch.cpu.get_capabilities()
    return DeviceCaps(
        "cpu",
        arch=platform.machine(),
        aten_isa=torch.backends.cpu.get_cpu_capability(),
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA")
        or os.environ.get("DNNL_MAX_CPU_ISA", ""),
        avx2=bool(flags.get("avx2")),
        avx512_bf16=bool(flags.get("avx512_bf16")),
        amx_bf16=bool(flags.get("amx_bf16")),
        arm_bf16=bool(flags.get("bf16")) or _arm_bf16(),
    )


def _arm_bf16() -> bool:
    if platform.machine() not in ("aarch64", "arm64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # macOS: not detected, so fp32 (never the slow path)
        return False
    return any(
        line.startswith("Features") and "bf16" in line.split(":", 1)[1].split()
        for line in text.splitlines()
    )


def resolve_precision(requested: str, device: torch.device) -> Resolved:
    """`choose_precision` for this device, the same on every rank: auto is bf16 only where
    every rank runs it natively (ranks of a job may sit on different CPUs)."""
    resolved = choose_precision(requested, device_caps(device))
    if requested == "auto":
        here = resolved.precision == "bf16"
        everywhere = all_ranks(here, device)  # collective: every rank asks, bf16 or not
        if here and not everywhere:
            reason = "auto: another rank's device does not run bf16 natively"
            resolved = Resolved("auto", "fp32", reason)
    return resolved


def autocast(precision: str, device_type: str):
    if precision not in DTYPES:  # "auto" must be resolved first (resolve_precision)
        raise ValueError(f"autocast needs bf16, fp16 or fp32, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision])


class DynamicLossScaler:
    """metaseq-style dynamic loss scaling. Disabled (scale 1, never skips) unless fp16."""

    def __init__(self, cfg: LossScaleConfig, enabled: bool):
        self.enabled = enabled
        self.window = cfg.window
        self.min_scale = cfg.min
        self.scale = cfg.init if enabled else 1.0
        self.good_steps = 0  # overflow-free steps since the last change of scale

    def found_overflow(self, params, group=None) -> bool:
        """Unscale gradients in place and report whether any is inf/NaN on any rank, so every
        rank skips the same step."""
        if not self.enabled:
            return False
        grads = [p.grad for p in params if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        device = grads[0].device if grads else torch.device("cpu")
        found = torch.zeros(1, dtype=torch.float32, device=device)
        inv = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=device)
        for dtype_grads in _by_dtype(grads):
            torch._amp_foreach_non_finite_check_and_unscale_(dtype_grads, found, inv)
        return bool(agree(found, "max", group).item())

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale /= 2.0
            self.good_steps = 0
            if self.scale < self.min_scale:
                raise LossScaleTooSmall(
                    f"fp16 loss scale fell to {self.scale:g}, below loss_scale.min="
                    f"{self.min_scale:g}: gradients overflow at every scale, so training has "
                    "diverged. Resume from an earlier checkpoint with a lower LR, skip the bad "
                    "data range, or use precision=bf16."
                )
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        if state["enabled"] == self.enabled:
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())
