"""FSDP2, tensor parallel and both together give the one-process run's losses."""

import json

import pytest
import torch

from opt_train.config import ParallelConfig
from opt_train.engine.loss import lm_loss
from opt_train.parallel.dims import ParallelDims
from tests.multirank import TINY_RUN, spawn
from tests.opt_train.conftest import train_on_ranks

TINY = [
    *TINY_RUN,
    "train.eval_interval=0",
    "train.max_steps=6",
    "checkpoint.interval=0",
]


def losses(run_dir) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def launch(nproc: int, run_dir, data, *extra: str) -> list[float]:
    train_on_ranks(nproc, [f"run_dir={run_dir}", f"data.path={data}", *TINY, *extra])
    return losses(run_dir)


# The fp32 runs (tests/opt_train/conftest.py's `fp32_mesh_run`, once a session) also evaluate,
# so test_multirank_eval reads its val_loss claim from the same runs; evaluation draws no
# random numbers and changes no weight, so the training losses are those of a run without it.
FP32_EVAL = ["precision=fp32", "train.eval_interval=2", "train.eval_batches=4"]


@pytest.mark.slow
@pytest.mark.multirank
def test_fp32_losses_equal_one_process_under_fsdp_tp_and_both(fp32_mesh_run):
    one = losses(fp32_mesh_run(1))
    runs = {
        "fsdp2": losses(fp32_mesh_run(2)),
        "tp2": losses(fp32_mesh_run(2, "parallel.tp=2")),
        "fsdp2xtp2": losses(fp32_mesh_run(4, "parallel.tp=2")),
    }
    assert len(one) == 6 and one[-1] < one[0]
    for name, got in runs.items():
        # fp32 reductions split across ranks sum in another order: ~1e-7 relative per sum,
        # compounding over 6 steps (measured at most 1.6e-7, under tp2). A one-sample shift,
        # another LR or a missed gradient reduction moves the loss by ~1e-2.
        assert got == pytest.approx(one, rel=2e-6), name


@pytest.mark.slow
@pytest.mark.multirank
def test_bf16_fsdp_x_tp_agrees_with_one_process_within_bf16_tolerance(tmp_path, small_shards):
    one = launch(1, tmp_path / "one", small_shards, "precision=bf16")
    both = launch(4, tmp_path / "2d", small_shards, "precision=bf16", "parallel.tp=2")
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3 per op); the two runs round
    # different intermediates (autocast vs FSDP's bf16 parameters) and the difference compounds
    # through training: measured 1.9e-6 at step 1 growing to 2.5e-3 at step 6. Bound: two bf16
    # unit roundoffs; a missed gradient reduction or a shifted sample moves the loss by ~1e-2.
    assert both == pytest.approx(one, rel=2 * 2**-8)


def test_mesh_validation_says_what_to_change():
    with pytest.raises(ValueError, match="not divisible by parallel.tp=3"):
        ParallelDims.from_config(ParallelConfig(tp=3), world=4)
    with pytest.raises(ValueError, match="must equal the world size 8"):
        ParallelDims.from_config(ParallelConfig(tp=2, dp_shard=2), world=8)
    dims = ParallelDims.from_config(ParallelConfig(tp=2, dp_replicate=2), world=8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 2, 2, 4)


def test_tp_must_divide_heads_ffn_and_vocab():
    from opt_train.config import ModelConfig

    dims = ParallelDims.from_config(ParallelConfig(tp=8), world=8)
    with pytest.raises(ValueError, match="model.n_heads=12 is not divisible by parallel.tp=8"):
        dims.check_model(ModelConfig(n_heads=12, d_model=768))


def _clip_on_2d_mesh(rank: int, world: int, want_norm: float) -> None:
    from opt_train.config import ModelConfig, ParallelConfig
    from opt_train.engine.optim import clip_grad_norm_
    from opt_train.model.opt import OPT
    from opt_train.parallel.apply import parallelize

    dims = ParallelDims.from_config(ParallelConfig(tp=2), world)
    mesh, _ = dims.build_mesh("cpu")
    torch.manual_seed(0)
    model = OPT(ModelConfig(vocab_size=64, d_model=32, n_heads=4, dropout=0, attention_dropout=0))
    parallelize(model, dims, mesh, "fp32", "off", False)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    loss = lm_loss(model, x[:, :-1], x[:, 1:])
    loss.backward()
    norm = clip_grad_norm_([p for p in model.parameters()], max_norm=1e-3)
    assert norm == pytest.approx(want_norm, rel=1e-5)
    after = clip_grad_norm_([p for p in model.parameters()], max_norm=0)
    assert after == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.slow
@pytest.mark.multirank
def test_grad_norm_clipping_over_a_2d_mesh_matches_one_process():
    """torch's clip_grad_norm_ fails on mixed-mesh DTensor grads; ours equals the plain norm."""
    from opt_train.config import ModelConfig
    from opt_train.model.opt import OPT

    torch.manual_seed(0)
    model = OPT(ModelConfig(vocab_size=64, d_model=32, n_heads=4, dropout=0, attention_dropout=0))
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    lm_loss(model, x[:, :-1], x[:, 1:]).backward()
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    # Each of the 2 data-parallel ranks sees the same batch here, so the mean gradient is the
    # one-process gradient.
    spawn(_clip_on_2d_mesh, 4, want)


def _adamw_on_fsdp2_shards(rank: int, world: int) -> None:
    from opt_train.config import ModelConfig, OptimConfig
    from opt_train.engine.optim import build_optimizer, param_groups
    from opt_train.model.opt import OPT
    from opt_train.parallel.apply import parallelize

    dims = ParallelDims.from_config(ParallelConfig(dp_shard=world), world)
    mesh, _ = dims.build_mesh("cpu")

    def sharded_model():
        torch.manual_seed(0)
        m = OPT(ModelConfig(vocab_size=64, d_model=32, n_heads=4, dropout=0, attention_dropout=0))
        parallelize(m, dims, mesh, "fp32", "off", False)
        return m

    model, twin = sharded_model(), sharded_model()
    cfg = OptimConfig()
    ours = build_optimizer(model, cfg)
    assert (ours.defaults["foreach"], ours.defaults["fused"]) == (True, False)
    loop = torch.optim.AdamW(
        param_groups(twin, cfg), lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False
    )
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(rank))
    for step in range(3):
        for m, opt in ((model, ours), (twin, loop)):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (step + 1)
            lm_loss(m, x[:, :-1], x[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.to_local(), b.to_local()), name
    for a, b in zip(ours.state.values(), loop.state.values(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a[key].to_local(), b[key].to_local()), key


@pytest.mark.multirank
def test_adamw_on_cpu_fsdp2_shards_takes_the_foreach_path_with_the_loops_numbers():
    """torch defaults CPU tensors to its per-parameter AdamW loop; on DTensors the project asks
    for the foreach kernels, which must give the loop's weights and moments bit for bit (the
    resume and old-checkpoint contracts compare floats exactly)."""
    spawn(_adamw_on_fsdp2_shards, 2)


def _meta_init_statistics(rank: int, world: int) -> None:
    import math

    from opt_train.config import ModelConfig, ParallelConfig
    from opt_train.model.opt import OPT
    from opt_train.parallel.apply import init_sharded_weights, parallelize

    dims = ParallelDims.from_config(ParallelConfig(tp=2), world)
    mesh, _ = dims.build_mesh("cpu")
    cfg = ModelConfig(vocab_size=4096, d_model=256, n_heads=4, n_layers=4)
    with torch.device("meta"):
        model = OPT(cfg)
    parallelize(model, dims, mesh, "fp32", "off", False)
    model.to_empty(device="cpu")
    init_sharded_weights(model, seed=0)
    out_std = 0.006 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        full = p.full_tensor()
        if name.endswith("bias"):
            assert torch.count_nonzero(full) == 0, name
        elif "layer_norm" in name:
            assert torch.all(full == 1.0), name
        else:
            want = out_std if name.endswith(("out_proj.weight", "fc2.weight")) else 0.006
            # A sample std of n normal draws has relative standard error 1/sqrt(2n): 5 sigma.
            rel = 5 / math.sqrt(2 * full.numel())
            assert full.std().item() == pytest.approx(want, rel=rel), name
            _shards_differ_across_every_mesh_dim(name, p)


def _shards_differ_across_every_mesh_dim(name: str, p) -> None:
    """Every rank's local shard against every other rank's: ranks at other coordinates along
    a mesh dim that splits the parameter (FSDP, TP, or both) hold different values; ranks
    that differ only along a replicating dim hold the same. Comparing pieces of the full
    tensor would need the layout (FSDP x TP is strided); local shards do not."""
    import torch.distributed as dist

    split = [not (pl.is_replicate() or pl.is_partial()) for pl in p.placements]
    coords = tuple(c for c, s in zip(p.device_mesh.get_coordinate(), split, strict=True) if s)
    mine = p.to_local().detach().clone()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (coords, mine))
    assert any(split), f"{name} is not split at all"
    for i, (ci, ti) in enumerate(everyone):
        for cj, tj in everyone[i + 1 :]:
            same = ti.shape == tj.shape and torch.equal(ti, tj)
            assert same == (ci == cj), f"{name}: shards at {ci} and {cj} equal={same}"


@pytest.mark.slow
@pytest.mark.multirank
def test_meta_device_init_gives_opt_statistics_per_shard():
    spawn(_meta_init_statistics, 4)
