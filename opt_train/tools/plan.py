"""Scale on paper: per-GPU memory and step time of a run, from its config alone.

`python -m opt_train.plan +model=opt-175b parallel.tp=8 nodes=124 gpus_per_node=8` composes the
same Hydra config as `train.py` (conf/train.yaml, the `model/` group, every typed key) and adds
the planner's own keys (`nodes`, `gpus_per_node`, `gpu_mem_gib`, `reserve_gib`, `mfu`,
`peak_tflops`, `format`). It prints, per GPU: parameter, gradient and optimizer bytes of the
FSDP2 x TP shards, the low-precision working copies FSDP2 all-gathers, activations for one
micro-batch under each activation-checkpointing mode, the peak, whether it fits, and the step
time implied by an MFU.

Why these numbers can be trusted: the shard shapes follow the TP plan (the one table,
`opt_train.parallel.apply.LAYER_TP_PLAN`, that `apply_tp` applies) and FSDP2's dim-0 sharding
(tests shard OPT-175B over a fake 1024-rank process group and compare every parameter's local
shape), and the activation model counts the tensors autograd saves in *this* implementation
(tests compare with the measured peak of tensor memory of small models on CPU).
docs/parallelism.md states the assumptions and the formulas.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_pipeline.config_limits import OneOf, Range, check_limits
from opt_train.config import PARALLEL_LIMITS, JobConfig, ModelConfig, check_value
from opt_train.engine.precision import resolve_precision
from opt_train.model.opt import param_shapes
from opt_train.overrides import check_overrides
from opt_train.parallel.apply import tp_split_dim
from opt_train.parallel.dims import ParallelDims
from opt_train.train.flops import flops_per_token

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the same conf/ as train.py
GIB = 2**30
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
AC_MODES = PARALLEL_LIMITS["activation_checkpoint"].choices


PLANNER_LIMITS = {
    "device": OneOf(("cuda", "cpu")),
    "format": OneOf(("table", "json")),
    "mfu": Range(0, 1, lo_open=True),
}


@dataclass
class PlannerConfig:
    """The planner's own keys, beside the training config's."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0  # A100-80GB
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers and allocator fragmentation
    mfu: float = 0.45  # OPT-175B reached about 47% on A100s
    peak_tflops: float = 312.0  # A100 dense bf16
    format: str = "table"  # table | json
    device: str = "cuda"  # cuda | cpu (what the tests measure: dropout masks differ)
    # FSDP2 even on one GPU (as benchmarks/gpu.py runs it); train.py uses autocast alone there.
    fsdp_alone: bool = False

    def __post_init__(self) -> None:
        check_limits(self, "", PLANNER_LIMITS)


# -- parameters ---------------------------------------------------------------------------------


def tp_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    dim = tp_split_dim(name)
    if dim is None or tp == 1:
        return shape
    if shape[dim] % tp:
        raise ValueError(f"{name} dim {dim} of size {shape[dim]} is not divisible by tp={tp}")
    return tuple(s // tp if i == dim else s for i, s in enumerate(shape))


def shard_shape(name: str, shape: tuple[int, ...], tp: int, dp_shard: int) -> tuple[int, ...]:
    """The local shape on rank 0 after TP and FSDP2: FSDP2 splits dim 0 of the TP-local tensor
    into dp_shard chunks of ceil(rows / dp_shard) (the last ones padded), replicated over
    dp_replicate. Rank 0 holds a full chunk, which is also what every rank allocates."""
    local = tp_local_shape(name, shape, tp)
    return (math.ceil(local[0] / dp_shard), *local[1:])


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass
class ParamCounts:
    total: int  # parameters of the whole model
    shard: int  # elements this rank stores (FSDP shard of the TP slice, padded)
    layer_unsharded: int  # one decoder layer after FSDP's all-gather (TP slice)
    root_unsharded: int  # embeddings, projections, final LayerNorm after all-gather
    embed_rows_local: int  # vocabulary rows of the output projection on this rank


def count_params(model: ModelConfig, tp: int, dp_shard: int) -> ParamCounts:
    shapes = param_shapes(model)
    layer = sum(
        numel(tp_local_shape(n, s, tp)) for n, s in shapes.items() if n.startswith("layers.0.")
    )
    root = sum(
        numel(tp_local_shape(n, s, tp)) for n, s in shapes.items() if not n.startswith("layers.")
    )
    return ParamCounts(
        total=sum(numel(s) for s in shapes.values()),
        shard=sum(numel(shard_shape(n, s, tp, dp_shard)) for n, s in shapes.items()),
        layer_unsharded=layer,
        root_unsharded=root,
        embed_rows_local=model.vocab_size // tp,
    )


# -- activations --------------------------------------------------------------------------------


@dataclass
class Activations:
    """Bytes of one micro-batch's activations on one GPU under one checkpointing mode."""

    mode: str
    per_layer: int  # saved for backward by one decoder layer
    layers: int  # all decoder layers
    outside: int  # embeddings, final LayerNorm, projections, the loss's gradient buffers
    transient: int  # the largest short-lived addition (loss chunk, recompute, layer backward)
    held: int = 0  # CPU: the loss's logits buffers, kept from the loss's forward on

    @property
    def saved(self) -> int:
        return self.layers + self.outside

    @property
    def peak(self) -> int:
        return self.saved + self.transient


def activations(
    model: ModelConfig,
    micro_batch: int,
    seq_len: int,
    tp: int,
    precision: str,
    mode: str,
    loss_chunk_tokens: int,
    weight_bytes: int,
    device: str = "cuda",
) -> Activations:
    """Activation bytes for this implementation (see docs/parallelism.md for the derivation).

    Per decoder layer, with N = micro_batch x seq_len tokens, d = d_model, f = ffn, p bytes per
    element of the compute dtype and t = tp, autograd keeps: four [N, d] tensors in the
    replicated region (the layer input and the first LayerNorm's output, the residual after
    attention and the second LayerNorm's output; post-LN 350m has the same count), a 1-byte
    mask per residual dropout, LayerNorm mean/rstd (fp32 per token); and split over tp: q, k, v
    and the attention output (SDPA flash/efficient keeps no T x T matrix, only a fp32
    logsumexp per head and token; attention dropout is replayed from the RNG seed, no mask),
    and the ReLU output [N, f] (fc2's input; fc1's output is not kept). `weight_bytes` is the
    dtype of the tied embedding the loss sees (the loss's gradient for it is cast to it).

    `device="cpu"` models what differs on CPU, where the tests measure: dropout keeps its mask
    in the compute dtype (CUDA's fused dropout keeps 1-byte booleans).
    """
    n = micro_batch * seq_len
    d, f, e, v = model.d_model, model.ffn, model.embed_dim, model.vocab_size // tp
    p = BYTES[precision]
    mask = n * d * (1 if device == "cuda" else p) if model.dropout > 0 else 0
    ln_stats = 2 * n * 4  # mean and rstd, fp32, per token
    lse = micro_batch * (model.n_heads // tp) * seq_len * 4
    qkvo = 4 * n * d * p // tp
    relu = n * f * p // tp
    off_layer = 4 * n * d * p + 2 * mask + 2 * ln_stats + qkvo + lse + relu
    check_value("parallel.activation_checkpoint", mode)
    if mode == "off":
        per_layer = off_layer
    elif mode == "full":
        per_layer = n * d * p  # the layer input; everything else is recomputed
    else:
        # apply._selective_policy keeps matmul and attention outputs: q, k, v, attention
        # output (+ logsumexp), out_proj's and fc2's [N, d] outputs and fc1's [N, f / t].
        per_layer = n * d * p + qkvo + lse + 2 * n * d * p + relu
    # In backward a layer is rebuilt to what `off` keeps: the recomputation reads the kept
    # tensors and consumes them (torch's selective checkpointing hands each kept output over
    # once and drops it), so it adds only the rest.
    recompute = off_layer - per_layer

    # Outside the layers: token ids, the final LayerNorm's (or 350m's project_in/out) inputs,
    # and the loss's gradient buffers, formed in forward: d/d hidden [N, e] in the compute
    # dtype and d/d embedding [V / t, e] in fp32.
    outside = n * 8
    if model.pre_layer_norm:
        outside += n * d * p + ln_stats // 2
    if model.embed_dim != model.d_model:
        outside += n * e * p + n * d * p
    loss_buffers = n * e * p + v * e * 4
    outside += loss_buffers

    # The largest short-lived addition on top of what is saved:
    chunk = min(loss_chunk_tokens, n)
    # The loss's logits for one chunk: a fp32 buffer worked in place (max, exp, softmax -
    # onehot), and under bf16/fp16 a second one in the compute dtype for the matmul's output.
    logits = chunk * v * (4 if p == 4 else 4 + p)
    # On CPU the loss keeps those buffers for the process (opt_train/engine/loss.py, _scratch), so
    # they stay under everything later in the step; on CUDA they go back to the allocator.
    held = logits if device == "cpu" else 0
    loss_forward = logits + n * e * p  # and the hidden states the loss reads (not saved)
    if weight_bytes != p:
        loss_forward += v * e * p  # the loss casts the fp32 weight to the compute dtype
    loss_backward = n * e * p + v * e * 4 + (v * e * weight_bytes if weight_bytes != 4 else 0)
    # A layer's backward: its recomputed activations (AC), the incoming and outgoing gradients
    # of the residual stream and two [N, f / t] gradients around the ReLU; the loss buffers
    # are gone by then, the embedding's gradient [V / t, e] is not.
    layer_backward = (
        recompute + 2 * n * d * p + 2 * relu - loss_buffers + v * e * max(weight_bytes, 4)
    )
    transient = max(loss_forward, loss_backward + held, layer_backward + held)
    return Activations(mode, per_layer, model.n_layers * per_layer, outside, transient, held)


# -- the plan -----------------------------------------------------------------------------------


@dataclass
class Plan:
    model: str
    world: int
    dp_replicate: int
    dp_shard: int
    tp: int
    precision: str
    micro_batch_size: int
    seq_len: int
    batch_tokens: int
    grad_accum: float  # micro-batches per rank per optimizer step (fractional: train.py refuses)
    params_total: int
    params_per_gpu: int
    bytes_params: int  # fp32 master shards
    bytes_grads: int  # fp32 gradient shards
    bytes_optimizer: int  # AdamW's two fp32 moments
    bytes_working: int  # low-precision unsharded parameters and gradients FSDP2 holds briefly
    activations: dict[str, Activations]
    peak: dict[str, int]  # per activation-checkpointing mode
    fits: dict[str, bool]
    gpu_mem_gib: float
    reserve_gib: float
    ac_mode: str
    flops_per_token: float
    step_time_s: float
    tokens_per_s: float
    mfu: float
    peak_tflops: float
    train_days: float  # train.max_steps at this step time
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["activations"] = {
            k: {**dataclasses.asdict(a), "saved": a.saved, "peak": a.peak}
            for k, a in self.activations.items()
        }
        return d


@dataclass
class _StateBytes:
    """Per-GPU bytes of what lives through the whole step, besides activations."""

    params: int  # fp32 master shards
    grads: int  # fp32 gradient shards
    optimizer: int  # AdamW's two fp32 moments
    working: int  # low-precision unsharded copies FSDP2 holds briefly (or autocast's, alone)
    weight_bytes: int  # bytes per element of the tied embedding the loss sees


def _state_bytes(counts: ParamCounts, p: int, distributed: bool) -> _StateBytes:
    if distributed:
        # FSDP2: the current layer and the prefetched next one all-gathered in the compute
        # dtype, the root (embeddings, final LayerNorm) gathered for the whole step
        # (reshard_after_forward=False), and in backward one layer's unsharded gradients in
        # the compute dtype plus their fp32 reduce-scatter input. In fp32 there is no cast.
        working = (2 * counts.layer_unsharded + counts.root_unsharded) * p
        working += counts.layer_unsharded * (p + 4)
        return _StateBytes(4 * counts.shard, 4 * counts.shard, 8 * counts.shard, working, p)
    # One process: fp32 parameters; autocast's bf16/fp16 copies of the weights are saved for
    # backward and live from forward through backward.
    working = counts.total * p if p != 4 else 0
    return _StateBytes(4 * counts.shard, 4 * counts.shard, 8 * counts.shard, working, 4)


def _planned_precision(job: JobConfig, planner: PlannerConfig) -> JobConfig:
    """`job` with `precision: auto` resolved as the planned device would resolve it. On GPUs
    auto plans bf16: every GPU the planner sizes for (A100 and later) runs it natively. On cpu
    it is what train.py resolves on this machine."""
    if job.precision != "auto":
        return job
    here = resolve_precision("auto", torch.device("cpu")).precision
    return dataclasses.replace(job, precision="bf16" if planner.device == "cuda" else here)


def _notes(job: JobConfig, planner: PlannerConfig, micro: int, dp: int, accum: float) -> list:
    notes: list[str] = []
    if accum != int(accum) or accum < 1:
        notes.append(
            f"train.batch_tokens={job.train.batch_tokens} is {job.global_batch_samples()} "
            f"sequences, not a multiple of train.micro_batch_size={micro} x dp={dp}: train.py "
            "refuses this; the numbers assume one micro-batch of that size"
        )
    if planner.device == "cpu" and job.model.attention_dropout > 0:
        notes.append(
            "on CPU, attention with dropout is written out (opt_train/model/opt.py) and keeps "
            "[T, T] attention weights per head; not modelled (set model.attention_dropout=0 to "
            "compare)"
        )
    return notes


def _peaks(
    acts: dict[str, Activations],
    state: _StateBytes,
    counts: ParamCounts,
    embed_dim: int,
    accum: float,
) -> dict[str, int]:
    """The step's peak per checkpointing mode. Gradients are sharded fp32 (reduce dtype). With
    one micro-batch per step they appear while backward frees activations (the trainer sets
    them to None after each step), so the peak holds the larger of the two; with accumulation
    they persist under the next micro-batch's activations and both count."""
    # At the end of backward: all gradients, plus the input embedding's dense gradient
    # [V / t, e] and its sum with the loss's contribution, both fp32, while the old one lives.
    grads_end = state.grads + 2 * 4 * counts.embed_rows_local * embed_dim
    fixed = state.params + state.optimizer + state.working
    return {
        mode: fixed + (a.peak + state.grads if accum > 1 else max(a.peak, grads_end + a.held))
        for mode, a in acts.items()
    }


def make_plan(job: JobConfig, planner: PlannerConfig) -> Plan:
    """Per-GPU memory and step time of `job` on `planner.nodes` x `planner.gpus_per_node` GPUs.

    Memory at the peak of a step: fp32 parameter shards (FSDP2 keeps the fp32 master as the
    sharded parameter), two fp32 AdamW moments, gradients, the working copies, activations.
    """
    job = _planned_precision(job, planner)
    world = planner.nodes * planner.gpus_per_node
    dims = ParallelDims.from_config(job.parallel, world)
    dims.check_model(job.model)
    m, tp, seq = job.model, dims.tp, job.data.seq_len
    counts = count_params(m, tp, dims.dp_shard)
    micro = job.resolve_micro_batch(dims.dp)
    accum = job.global_batch_samples() / (micro * dims.dp)
    state = _state_bytes(counts, BYTES[job.precision], world > 1 or planner.fsdp_alone)
    acts = {
        mode: activations(
            m,
            micro,
            seq,
            tp,
            job.precision,
            mode,
            job.train.loss_chunk_tokens,
            state.weight_bytes,
            planner.device,
        )
        for mode in AC_MODES
    }
    peak = _peaks(acts, state, counts, m.embed_dim, accum)
    budget = (planner.gpu_mem_gib - planner.reserve_gib) * GIB
    fpt = flops_per_token(m, seq)
    step = job.train.batch_tokens * fpt / (world * planner.peak_tflops * 1e12 * planner.mfu)
    return Plan(
        model=m.name,
        world=world,
        dp_replicate=dims.dp_replicate,
        dp_shard=dims.dp_shard,
        tp=tp,
        precision=job.precision,
        micro_batch_size=micro,
        seq_len=seq,
        batch_tokens=job.train.batch_tokens,
        grad_accum=accum,
        params_total=counts.total,
        params_per_gpu=counts.shard,
        bytes_params=state.params,
        bytes_grads=state.grads,
        bytes_optimizer=state.optimizer,
        bytes_working=state.working,
        activations=acts,
        peak=peak,
        fits={mode: b <= budget for mode, b in peak.items()},
        gpu_mem_gib=planner.gpu_mem_gib,
        reserve_gib=planner.reserve_gib,
        ac_mode=job.parallel.activation_checkpoint,
        flops_per_token=fpt,
        step_time_s=step,
        tokens_per_s=job.train.batch_tokens / step,
        mfu=planner.mfu,
        peak_tflops=planner.peak_tflops,
        train_days=job.train.max_steps * step / 86400,
        notes=_notes(job, planner, micro, dims.dp, accum),
    )


def format_table(plan: Plan) -> str:

    def row(label: str, *values: str) -> str:
        return f"  {label:<40}" + " ".join(f"{v:>10}" for v in values)

    def gib(b: float) -> str:
        return f"{b / GIB:.2f}"

    lines = [
        f"{plan.model}: {plan.params_total / 1e9:.2f}B parameters, precision {plan.precision}",
        f"mesh: {plan.world} GPUs = dp_replicate {plan.dp_replicate} x dp_shard {plan.dp_shard}"
        f" x tp {plan.tp}",
        f"micro-batch {plan.micro_batch_size} x {plan.seq_len} tokens; "
        f"{plan.batch_tokens:,} tokens per step = {plan.grad_accum:g} micro-batch(es) per GPU",
        "",
        f"{f'per GPU: {plan.params_per_gpu / 1e6:.1f}M parameters':<42}{'GiB':>10}",
        row("parameters (fp32 master shards)", gib(plan.bytes_params)),
        row("gradients (fp32 shards)", gib(plan.bytes_grads)),
        row("optimizer (AdamW, 2 fp32 moments)", gib(plan.bytes_optimizer)),
        row(f"working copies (unsharded, {plan.precision})", gib(plan.bytes_working)),
        "",
        f"{'activation checkpointing':<42}" + " ".join(f"{m:>10}" for m in AC_MODES),
        row("activations saved per layer", *(gib(plan.activations[k].per_layer) for k in AC_MODES)),
        row("activations saved, all", *(gib(plan.activations[k].saved) for k in AC_MODES)),
        row("activations at peak", *(gib(plan.activations[k].peak) for k in AC_MODES)),
        row("total peak per GPU", *(gib(plan.peak[k]) for k in AC_MODES)),
        row(
            f"fits {plan.gpu_mem_gib:g} GiB less {plan.reserve_gib:g} reserved",
            *("yes" if plan.fits[k] else "NO" for k in AC_MODES),
        ),
        f"  (this config: parallel.activation_checkpoint={plan.ac_mode})",
        "",
        f"step time at MFU {plan.mfu:g} of {plan.peak_tflops:g} TFLOP/s per GPU: "
        f"{plan.step_time_s:.2f} s",
        f"  {plan.flops_per_token / 1e9:.2f} GFLOP per token, {plan.tokens_per_s:,.0f} tokens/s "
        f"({plan.tokens_per_s / plan.world:,.0f} per GPU); train.max_steps in "
        f"{plan.train_days:.1f} days",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------


def _planner_keys() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(PlannerConfig)}


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(training-config overrides for Hydra, planner overrides). A top-level key that is in
    neither schema stops here with the valid keys of both and the closest match."""
    planner_keys = _planner_keys()
    job_keys = {f.name for f in fields(JobConfig)}
    hydra, mine = [], []
    for ov in argv:
        key = ov.split("=", 1)[0]
        if "=" in ov and key in planner_keys:
            mine.append(ov)
            continue
        top = key.lstrip("+~").split(".", 1)[0].split("/", 1)[0]
        if "=" in ov and not ov.startswith(("+", "~", "hydra")) and top not in job_keys:
            known = sorted(job_keys | set(planner_keys))
            close = difflib.get_close_matches(top, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise SystemExit(
                f"error: unknown config key '{key}'.{hint}\n"
                f"Planner keys: {', '.join(planner_keys)}\n"
                f"Training config keys: {', '.join(sorted(job_keys))}"
            )
        hydra.append(ov)
    check_overrides(hydra)
    return hydra, mine


def compose(argv: list[str]) -> tuple[JobConfig, PlannerConfig]:
    """The typed training config exactly as train.py would compose it, and the planner's."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from opt_train.config import register_configs
    from opt_train.launch import to_job_config

    hydra_ov, planner_ov = split_overrides(argv)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("train", overrides=hydra_ov)
    job = to_job_config(cfg)
    try:
        planner = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(PlannerConfig), OmegaConf.from_dotlist(planner_ov))
        )
    except Exception as e:
        raise SystemExit(f"error: invalid planner config: {e.__cause__ or e}") from None
    return job, planner


def main(argv: list[str] | None = None) -> Plan:
    job, planner = compose(sys.argv[1:] if argv is None else argv)
    try:
        plan = make_plan(job, planner)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if planner.format == "json":
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(format_table(plan))
    return plan


if __name__ == "__main__":
    main()
