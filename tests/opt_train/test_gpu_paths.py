"""The choices the CUDA paths make, checked on CPU: which GPU a rank binds to, allocator and
TF32 settings, the MFU peak by GPU name and precision, which kernels the model and optimizer
pick for non-CPU tensors, pinned checkpoint staging, and the planner's FSDP2-on-one-GPU mode.
(No GPU here: what only a GPU can show is in benchmarks/gpu.py.)"""

from __future__ import annotations

import logging
import math
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from opt_train.checkpoint.weights import pinned_staging
from opt_train.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from opt_train.engine.optim import use_fused_adamw
from opt_train.model.dropout import dropout, uses_bulk_dropout
from opt_train.model.opt import OPT, Attention
from opt_train.parallel.apply import apply_ac, sdpa_ops
from opt_train.parallel.process_groups import configure_cuda, cuda_index, with_expandable_segments
from opt_train.tools.plan import PlannerConfig, count_params, make_plan
from opt_train.train.flops import device_peak_flops, gpu_peak_tflops, matmul_precision


def test_each_rank_binds_its_local_gpu_or_the_one_it_was_given():
    assert [cuda_index(r, 8) for r in range(8)] == list(range(8))
    assert cuda_index(3, 1) == 0  # one GPU per task (Slurm --gpus-per-task=1)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=4 but only 2 CUDA devices"):
        cuda_index(4, 2)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_index(0, 0)


def test_expandable_segments_are_added_unless_the_user_chose():
    assert with_expandable_segments(None) == "expandable_segments:True"
    assert (
        with_expandable_segments("max_split_size_mb:128")
        == "max_split_size_mb:128,expandable_segments:True"
    )
    assert with_expandable_segments("expandable_segments:False") == "expandable_segments:False"


def test_configure_cuda_sets_the_allocator_variable_and_tf32(monkeypatch):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")
    try:
        configure_cuda(tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        configure_cuda(tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    import os

    # The user's variable is amended once (the second call finds the setting there).
    assert os.environ["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:64,expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


@pytest.mark.parametrize(
    ("name", "precision", "tf32", "model", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", True, "H100 SXM", 989.5),
        ("NVIDIA H100 80GB HBM3", "fp32", True, "H100 SXM", 494.5),
        ("NVIDIA H100 80GB HBM3", "fp32", False, "H100 SXM", 67.0),
        ("NVIDIA H100 PCIe", "bf16", True, "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "fp16", True, "H100 NVL", 835.5),
        ("NVIDIA H200", "bf16", True, "H200 SXM", 989.5),
        ("NVIDIA H200 NVL", "bf16", True, "H200 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", False, "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "fp32", True, "A100", 156.0),
        ("NVIDIA A100-SXM4-40GB", "fp32", False, "A100", 19.5),
        ("NVIDIA L40S", "bf16", True, "L40S", 362.05),
        ("NVIDIA L40", "bf16", True, "L40", 181.05),
        ("NVIDIA L4", "bf16", True, "L4", 121.0),
        ("NVIDIA A10", "bf16", True, "A10", 125.0),
        ("Tesla V100-SXM2-32GB", "fp16", True, "V100 SXM2", 125.0),
    ],
)
def test_the_peak_follows_the_gpu_and_the_precision_its_matmuls_run_in(
    name, precision, tf32, model, tflops
):
    assert gpu_peak_tflops(name, precision, tf32) == (model, tflops)


@pytest.mark.parametrize(
    ("name", "precision"),
    [
        ("NVIDIA GeForce RTX 4090", "bf16"),  # not in the table
        ("NVIDIA A10G", "bf16"),  # not the A10's figures: unknown, not guessed
        ("NVIDIA GH200 480GB", "bf16"),  # not an H200
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16"),  # a slice of the GPU
        ("Tesla V100-SXM2-32GB", "bf16"),  # no bf16 tensor cores
        ("Tesla V100-SXM2-32GB", "fp32"),  # TF32 asked, none there
    ],
)
def test_no_peak_is_made_up(name, precision):
    assert gpu_peak_tflops(name, precision, tf32=True) is None


def test_fp32_counts_as_tf32_only_when_tf32_is_on():
    assert matmul_precision("fp32", True) == "tf32"
    assert matmul_precision("fp32", False) == "fp32"
    assert matmul_precision("bf16", True) == "bf16"


def test_an_unknown_gpu_gets_nan_mfu_and_one_warning(monkeypatch, caplog):
    # The only thing faked: the name the CUDA driver would report.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery X1")
    cuda = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="opt_train.train.flops"):
        assert math.isnan(device_peak_flops(cuda, "bf16", None))
        assert math.isnan(device_peak_flops(cuda, "bf16", None))
    said = [r for r in caplog.records if "MFU unknown" in r.getMessage()]
    assert len(said) == 1 and "NVIDIA Mystery X1" in said[0].getMessage()
    assert device_peak_flops(cuda, "bf16", 400.0) == 400e12  # logging.peak_tflops wins


class _FunctionCalls(TorchFunctionMode):
    """Records the torch functions called (no patching: torch's own override protocol)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class _AtenCounts(TorchDispatchMode):
    """Counts the aten kernels that actually run (a kernel whose saved output is reused in
    backward does not run again)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("device", "fused"), [("cpu", False), ("meta", True)])
def test_non_cpu_tensors_keep_sdpa_and_fused_dropout(device, fused):
    # The written-out attention and bulk-bits dropout are for plain CPU tensors only; any
    # other device (meta stands in for CUDA here) takes F.dropout and SDPA's kernels.
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=64, attention_dropout=0.1)
    attention = Attention(cfg).to(device).train()
    with _FunctionCalls() as calls:
        attention(torch.randn(2, 8, 32, device=device))
        dropout(torch.randn(4, device=device), 0.1)
    assert ("scaled_dot_product_attention" in calls.names) == fused, calls.names
    assert ("dropout" in calls.names) == fused, calls.names  # F.dropout, the fused kernel
    assert uses_bulk_dropout(torch.empty(2, device=device)) != fused


def test_selective_checkpointing_saves_every_attention_kernel():
    # The CUDA kernels cannot run here: each must at least be in the save list.
    names = {str(op) for op in sdpa_ops()}
    for kernel in ("flash_attention", "efficient_attention", "cudnn_attention"):
        assert any(kernel in n for n in names), kernel
    # What the policy saves, run for real on CPU (SDPA's CPU flash kernel without dropout):
    # in backward, selective recomputes LayerNorm and ReLU but neither attention nor a matmul;
    # full recomputes attention too (2 layers: 2 attention calls per forward).
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_positions=64)
    cfg.dropout = cfg.attention_dropout = 0.0
    aten = torch.ops.aten
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu.default
    runs = {}
    for mode in ("off", "selective", "full"):
        torch.manual_seed(0)
        model = OPT(cfg).train()
        apply_ac(model, mode)
        with _AtenCounts() as ops:
            model(torch.randint(0, 64, (2, 8))).sum().backward()
        runs[mode] = ops.counts
    assert runs["off"][sdpa] == 2 and runs["full"][sdpa] == 4
    assert runs["selective"][sdpa] == runs["off"][sdpa]  # saved, not recomputed
    addmm, mm = aten.addmm.default, aten.mm.default  # forward matmuls; mm: weight gradients
    assert runs["selective"][addmm] == runs["off"][addmm] < runs["full"][addmm]
    assert runs["selective"][mm] == runs["off"][mm]
    for cheap in (aten.relu.default, aten.native_layer_norm.default):
        assert runs["selective"][cheap] > runs["off"][cheap]  # recomputed, as chosen


def test_fused_adamw_for_plain_tensors():
    assert use_fused_adamw([torch.nn.Parameter(torch.zeros(2))])


def test_cpu_weights_are_staged_in_plain_memory():
    assert not pinned_staging(torch.nn.Linear(2, 2))


def test_the_planner_models_fsdp2_on_one_gpu_when_asked():
    model = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=512, max_positions=64)
    job = JobConfig(
        precision="bf16",
        model=model,
        train=TrainConfig(micro_batch_size=2, batch_tokens=128),
        data=DataConfig(seq_len=64),
    )
    alone = make_plan(job, PlannerConfig(nodes=1, gpus_per_node=1))
    fsdp = make_plan(job, PlannerConfig(nodes=1, gpus_per_node=1, fsdp_alone=True))
    c = count_params(model, 1, 1)
    assert alone.bytes_working == c.total * 2  # autocast's bf16 weight copies
    assert fsdp.bytes_working == (2 * c.layer_unsharded + c.root_unsharded) * 2 + (
        c.layer_unsharded * 6
    )
