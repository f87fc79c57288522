"""Parallelism applied to the plain OPT module from outside, in this order:
tensor parallel (Megatron-style, DTensor), activation checkpointing, torch.compile, FSDP2.

The model file knows nothing of this. TP shards q/k/v and fc1 by output features
(column-parallel) and attention-out and fc2 by input features (row-parallel), so each block
needs one all-reduce after attention and one after the FFN; the token embedding is split over
the vocabulary, and the loss (opt_train/engine/loss.py) uses that split directly, so full-vocabulary
logits never exist on any rank. FSDP2 then shards every decoder layer and the root over the
data-parallel ranks, with a mixed-precision policy per `precision`.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from opt_train.config import check_value
from opt_train.model.dtypes import DTYPES
from opt_train.model.opt import OPT
from opt_train.parallel.dims import ParallelDims

# The TP plan, by module path inside a decoder layer. `apply_tp` applies it and the memory
# planner (opt_train/tools/plan.py) sizes shards from it, so the two cannot drift. Column-
# parallel layers split weight and bias by output features (dim 0); row-parallel layers split
# the weight by input features (dim 1) and keep the bias whole. The token embedding (outside
# the layers) is row-parallel too: an nn.Embedding's weight is [vocab, width], so it is split
# by vocabulary.
LAYER_TP_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.out_proj": "rowwise",
    "fc1": "colwise",
    "fc2": "rowwise",
}


def tp_split_dim(name: str) -> int | None:
    """The dimension tensor parallel splits parameter `name` (as `OPT.named_parameters` names
    it) along, or None if every TP rank holds it whole."""
    if name == "embed_tokens.weight":
        return 0
    module, kind = name.rsplit(".", 1)
    if not module.startswith("layers."):
        return None
    style = LAYER_TP_PLAN.get(module.split(".", 2)[2])
    if style == "colwise":
        return 0
    if style == "rowwise" and kind == "weight":
        return 1
    return None


def apply_tp(model: OPT, tp_mesh: DeviceMesh) -> None:
    parallelize_module(
        model,
        tp_mesh,
        {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())},
    )
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in model.layers:
        plan = {path: styles[style]() for path, style in LAYER_TP_PLAN.items()}
        parallelize_module(layer, tp_mesh, plan)


def sdpa_ops() -> set:
    """Every kernel SDPA may dispatch to: flash and memory-efficient (CUDA), cuDNN (CUDA,
    chosen on H100-class GPUs by some torch versions) and the CPU flash kernel. A kernel left
    out of the selective policy's save list would be recomputed in backward, attention
    included (the layer's most expensive op after the matmuls)."""
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


def _selective_policy():
    """Save matmul and attention outputs, recompute the cheap elementwise ops (LayerNorm,
    ReLU, dropout, residual adds): most of full AC's memory saving at a fraction of its cost."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, *sdpa_ops()}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_ac(model: OPT, mode: str) -> None:
    """Activation checkpointing per decoder layer: `full` recomputes the whole layer in
    backward; `selective` keeps matmul/attention outputs and recomputes the rest."""
    check_value("parallel.activation_checkpoint", mode)
    if mode == "off":
        return
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs = {"preserve_rng_state": True}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy())
    for i, layer in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(layer, **kwargs)


def apply_compile(model: OPT, backend: str = "inductor") -> None:
    """torch.compile each decoder layer (one graph reused by all layers: dynamo treats the
    layers' parameters as inputs, so the layers share one compiled graph; a process that
    compiles models of several shapes should call torch._dynamo.reset() between them, or
    the recompilation limit sends later layers back to eager). `backend`: inductor for
    speed; benchmarks/gpu.py's CPU dry run uses aot_eager (traced, without C++ codegen)."""
    for layer in model.layers:
        layer.compile(backend=backend)


def mixed_precision_policy(precision: str, root: bool) -> MixedPrecisionPolicy:
    """Low-precision parameters and compute with fp32 gradient reduction; the root's output
    is fp32. Layers hand low-precision activations to each other: an fp32 layer output would
    meet the next low-precision LayerNorm weight (CPU kernels refuse mixed dtypes)."""
    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=DTYPES[precision],
        reduce_dtype=torch.float32,
        output_dtype=torch.float32 if root else None,
    )


def apply_fsdp(model: OPT, dp_mesh: DeviceMesh, precision: str) -> None:
    for layer in model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mixed_precision_policy(precision, root=False))
    # The root holds the embeddings (also the output projection) and the final LayerNorm;
    # it stays unsharded from forward through backward, which the loss relies on.
    fully_shard(
        model,
        mesh=dp_mesh,
        mp_policy=mixed_precision_policy(precision, root=True),
        reshard_after_forward=False,
    )


def dp_mesh_of(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """FSDP's mesh: shard over dp_shard; with dp_replicate > 1, HSDP over both."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def parallelize(
    model: OPT,
    dims: ParallelDims,
    mesh: DeviceMesh,
    precision: str,
    ac: str,
    compile: bool,
    compile_backend: str = "inductor",
) -> OPT:
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    apply_ac(model, ac)
    if compile:
        apply_compile(model, compile_backend)
    apply_fsdp(model, dp_mesh_of(mesh, dims), precision)
    return model


def _shard_seed(seed: int, name: str, p: torch.Tensor) -> int:
    """A seed for one parameter shard: the run seed, the parameter's name and the shard's
    coordinates along the mesh dimensions it is split over (replicas draw the same values)."""
    coords: list[int] = []
    if isinstance(p, DTensor):
        mine = p.device_mesh.get_coordinate() or []
        # Any placement that is neither Replicate nor Partial splits the tensor (FSDP x TP
        # uses _StridedShard, for which is_shard() is False).
        coords = [
            c
            for c, pl in zip(mine, p.placements, strict=True)
            if not (pl.is_replicate() or pl.is_partial())
        ]
    key = f"{seed}|{name}|{coords}".encode()
    return zlib.crc32(key) | (seed << 32)


@torch.no_grad()
def init_sharded_weights(model: nn.Module, seed: int) -> None:
    """OPT's init applied to each shard after meta-device construction, so that no rank ever
    materialises the whole model. Each shard draws from its own generator (seeded by name and
    shard coordinates), giving the one-process model's statistics: normal(0, std) per the
    model's `init_std`, zero biases, unit LayerNorm weights."""
    inner = model
    for name, p in model.named_parameters():
        clean = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        std = inner.init_std(clean)
        local = p.to_local() if isinstance(p, DTensor) else p
        if std is None:
            local.fill_(1.0 if "layer_norm" in clean and clean.endswith("weight") else 0.0)
            continue
        g = torch.Generator(device=local.device).manual_seed(_shard_seed(seed, clean, p))
        local.normal_(0.0, std, generator=g)
