"""The measured cases of benchmarks/gpu.py (its docstring says what each section checks): the
shapes of a GPU run and of the CPU dry run, the printed table, and the correctness, speed,
baseline and checkpoint rows. benchmarks/gpu.py orders them, guards the time budget and
turns a case's error into a failed row."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
import torch.distributed as dist

from opt_train.config import (
    DataConfig,
    JobConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from opt_train.train.flops import flops_per_token

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
CHUNK = TrainConfig().loss_chunk_tokens  # the trainer's default loss chunk


@dataclass
class Shapes:
    """What a run measures: the real sizes on a GPU, tiny ones for the CPU dry run."""

    tiny: ModelConfig
    tiny_batch: int
    tiny_seq: int
    models: dict[str, ModelConfig]
    seq: int
    micro_batches: tuple[int, ...]  # tried largest first; the planner says which fits
    warmup: int
    steps: int
    compile_backend: str
    correctness_steps: int = 20
    ac_modes: tuple[str, ...] = ("off", "selective", "full")
    compile_ac: tuple[str, ...] = ("off", "selective", "full")  # AC modes also run compiled


def gpu_shapes() -> Shapes:
    return Shapes(
        tiny=ModelConfig(dropout=0.0, attention_dropout=0.0),  # conf/train.yaml's opt-tiny
        tiny_batch=8,
        tiny_seq=128,
        models={name: model_config(name) for name in ("opt-2.7b", "opt-1.3b")},
        seq=2048,
        micro_batches=(8, 4, 2, 1),
        warmup=3,
        steps=6,
        compile_backend="inductor",
    )


def dry_shapes() -> Shapes:
    def small(name: str, d: int) -> ModelConfig:
        return ModelConfig(
            name=name, vocab_size=512, n_layers=2, n_heads=4, d_model=d, max_positions=64
        )

    return Shapes(
        tiny=ModelConfig(
            vocab_size=512,
            n_layers=2,
            n_heads=4,
            d_model=64,
            max_positions=64,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        tiny_batch=4,
        tiny_seq=32,
        # One model stands for both sizes: the rows it gives are the ones each size gives.
        models={"opt-1.3b (dry: 2 x 64)": small("dry", 64)},
        seq=64,
        micro_batches=(2,),
        warmup=1,
        steps=2,
        compile_backend="aot_eager",  # dynamo and AOT autograd without inductor's C++ builds
        correctness_steps=6,
        compile_ac=("off",),
    )


def model_config(name: str) -> ModelConfig:
    """An OPT size exactly as conf/model/<name>.yaml gives it to train.py."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.model))


# -- the table ----------------------------------------------------------------------------------


@dataclass
class Table:
    budget_s: float
    t0: float = field(default_factory=time.perf_counter)
    rows: list[dict] = field(default_factory=list)

    def header(self) -> None:
        print("| section | case | measured | target | pass |")
        print("|---|---|---|---|---|", flush=True)

    def add(self, section: str, case: str, measured: str, target: str = "-", ok=None, **data):
        verdict = {True: "yes", False: "NO", None: "-"}[ok] if ok != "skipped" else "skipped"
        row = {"section": section, "case": case, "measured": measured, "target": target}
        row.update(passed=verdict, at_s=round(self.elapsed(), 1), **data)
        self.rows.append(row)
        print(f"| {section} | {case} | {measured} | {target} | {verdict} |", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.budget_s


# -- shared pieces ------------------------------------------------------------------------------


def init_one_rank(device: torch.device) -> None:
    """A one-rank process group over an in-memory store (no port): FSDP2 and DCP need one.
    On a GPU NCCL for CUDA tensors and gloo beside it for CPU ones (async checkpoint staging)."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=device if device.type == "cuda" else None,
    )


@cache
def _mesh(device_type: str):
    from opt_train.parallel.dims import ParallelDims

    dims = ParallelDims.from_config(ParallelConfig(), 1)
    return dims, dims.build_mesh(device_type)[0]


def one_rank_mesh(device: torch.device):
    """The trainer's mesh for one rank, built once per device type (each build makes process
    groups, NCCL communicators on a GPU)."""
    return _mesh(device.type)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(device: torch.device) -> None:
    """Forget compiled graphs (their recompilation limit is per code object, and every model
    shape recompiles the same DecoderLayer.forward) and free memory between rows."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def patterned_batches(n: int, batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    """Learnable token sequences (arithmetic progressions mod a small range), so the loss moves
    over the steps compared; fixed by a seed, identical for every run."""
    g = torch.Generator().manual_seed(1234)
    span = min(vocab, 500)
    out = []
    for _ in range(n):
        start = torch.randint(0, span, (batch, 1), generator=g)
        stride = torch.randint(1, 7, (batch, 1), generator=g)
        out.append((start + stride * torch.arange(seq + 1)) % span)
    return out


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def train_steps(model, optimizer, batches, device, autocast_precision, chunk: int) -> list[float]:
    """The trainer's step, one micro-batch each: forward through the chunked loss, backward,
    clip at 1.0, AdamW; returns the losses."""
    from opt_train.engine.loss import lm_loss
    from opt_train.engine.optim import clip_grad_norm_
    from opt_train.engine.precision import autocast

    model.train()
    losses = []
    for x in batches:
        x = x.to(device, non_blocking=True)
        with autocast(autocast_precision, device.type):
            loss = lm_loss(model, x[:, :-1], x[:, 1:], chunk)
        loss.backward()
        clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
    return [float(v) for v in torch.stack(losses).tolist()]


# -- 1. correctness -----------------------------------------------------------------------------


def tiny_losses(
    shapes: Shapes, device: torch.device, precision: str, fsdp: bool, compile: bool
) -> list[float]:
    """First losses of the tiny model: weights drawn on the CPU from one seed and moved, so
    every run starts from the same values; FSDP2 on one rank (mixed precision by its policy)
    or, with `fsdp=False`, the plain module under autocast as train.py runs one process."""
    from opt_train.engine.optim import build_optimizer, set_lr
    from opt_train.model.opt import OPT
    from opt_train.parallel.apply import apply_compile, parallelize

    fresh(device)
    torch.manual_seed(0)
    model = OPT(shapes.tiny).to(device)
    if fsdp:
        dims, mesh = one_rank_mesh(device)
        parallelize(model, dims, mesh, precision, "off", compile, shapes.compile_backend)
    elif compile:
        apply_compile(model, shapes.compile_backend)
    optimizer = build_optimizer(model, OptimConfig())
    set_lr(optimizer, 1e-3)
    batches = patterned_batches(
        shapes.correctness_steps, shapes.tiny_batch, shapes.tiny_seq, shapes.tiny.vocab_size
    )
    return train_steps(model, optimizer, batches, device, "fp32" if fsdp else precision, CHUNK)


def correctness(table: Table, shapes: Shapes, device: torch.device) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cudnn.allow_tf32 = False
    cpu = torch.device("cpu")
    name = device.type.upper()
    ref = tiny_losses(shapes, cpu, "fp32", fsdp=False, compile=False)
    runs = {"fp32": tiny_losses(shapes, device, "fp32", fsdp=True, compile=False)}
    d = rel_diff(runs["fp32"], ref)
    table.add(
        "correctness",
        f"{name} fp32 (FSDP2, 1 rank) vs CPU fp32, {shapes.correctness_steps} losses",
        f"max rel diff {d:.2e} (loss {ref[0]:.4f} -> {ref[-1]:.4f})",
        "<= 1e-4",
        d <= 1e-4,
        value=d,
    )
    runs["bf16"] = tiny_losses(shapes, device, "bf16", fsdp=True, compile=False)
    d = rel_diff(runs["bf16"], runs["fp32"])
    table.add(
        "correctness",
        f"{name} bf16 vs {name} fp32",
        f"max rel diff {d:.2e}",
        "<= 2e-2",
        d <= 2e-2,
        value=d,
    )
    if not table.fits(60 if device.type == "cuda" else 20):
        table.add("correctness", "compile on vs off (fp32)", "time budget", ok="skipped")
        return
    compiled = tiny_losses(shapes, device, "fp32", fsdp=True, compile=True)
    d = rel_diff(compiled, runs["fp32"])
    table.add(
        "correctness",
        f"{name} fp32 compile ({shapes.compile_backend}) vs eager",
        f"max rel diff {d:.2e}",
        "<= 1e-3",
        d <= 1e-3,
        value=d,
    )


# -- 2. speed -----------------------------------------------------------------------------------


def planned_peak(model: ModelConfig, micro_batch: int, seq: int, ac: str, device) -> float:
    """opt_train/tools/plan.py's peak for this run: FSDP2 on one GPU, bf16."""
    from opt_train.tools.plan import PlannerConfig, make_plan

    job = JobConfig(
        model=model,
        precision="bf16",
        train=TrainConfig(micro_batch_size=micro_batch, batch_tokens=micro_batch * seq),
        data=DataConfig(seq_len=seq),
        parallel=ParallelConfig(activation_checkpoint=ac),
    )
    mem = (
        torch.cuda.get_device_properties(device).total_memory / GIB
        if device.type == "cuda"
        else 1e6
    )
    planner = PlannerConfig(
        nodes=1, gpus_per_node=1, gpu_mem_gib=mem, fsdp_alone=True, device=device.type
    )
    return make_plan(job, planner).peak[ac]


def pick_micro_batch(shapes: Shapes, model: ModelConfig, device) -> int | None:
    """The largest micro-batch whose planned peak (AC off) leaves 10% of the GPU free."""
    if device.type != "cuda":
        return shapes.micro_batches[0]
    total = torch.cuda.get_device_properties(device).total_memory
    for mb in shapes.micro_batches:
        if planned_peak(model, mb, shapes.seq, "off", device) <= 0.9 * total:
            return mb
    return None


def build_ours(model_cfg: ModelConfig, device, ac: str, compile: bool, backend: str):
    """As the trainer builds a sharded run: meta device, parallelize (AC, compile, FSDP2 with
    the bf16 policy), then each shard allocated and given OPT's init."""
    from opt_train.engine.optim import build_optimizer, set_lr
    from opt_train.model.opt import OPT
    from opt_train.parallel.apply import init_sharded_weights, parallelize

    with torch.device("meta"):
        model = OPT(model_cfg)
    dims, mesh = one_rank_mesh(device)
    parallelize(model, dims, mesh, "bf16", ac, compile, backend)
    model.to_empty(device=device)
    init_sharded_weights(model, seed=0)
    optimizer = build_optimizer(model, OptimConfig())
    set_lr(optimizer, 1e-4)
    return model, optimizer


def timed_run(step_fn, batches, shapes: Shapes, device) -> tuple[float, list[float]]:
    """Seconds per step over the timed steps, after the warm-up ones (compilation, allocator)."""
    warm = step_fn(batches[: shapes.warmup])
    sync(device)
    t0 = time.perf_counter()
    losses = step_fn(batches[shapes.warmup :])
    sync(device)
    return (time.perf_counter() - t0) / shapes.steps, warm + losses


def random_batches(shapes: Shapes, vocab: int, micro_batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = shapes.warmup + shapes.steps
    return [torch.randint(0, vocab, (micro_batch, shapes.seq + 1), generator=g) for _ in range(n)]


@dataclass
class SpeedResult:
    tokens_per_s: float
    tflops: float
    mfu: float
    peak_gib: float | None


def speed_row(table, shapes, device, label, model_cfg, mb, compile, ac, peak_tflops):
    """One speed row; returns its result and the trained model and optimizer (for the
    checkpoint row)."""
    fresh(device)
    model, optimizer = build_ours(model_cfg, device, ac, compile, shapes.compile_backend)
    batches = random_batches(shapes, model_cfg.vocab_size, mb)
    dt, losses = timed_run(
        lambda bs: train_steps(model, optimizer, bs, device, "fp32", CHUNK), batches, shapes, device
    )
    tps = mb * shapes.seq / dt
    tflops = tps * flops_per_token(model_cfg, shapes.seq) / 1e12
    mfu = tflops / peak_tflops if peak_tflops else float("nan")
    plan_gib = planned_peak(model_cfg, mb, shapes.seq, ac, device) / GIB
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GIB
        err = plan_gib / peak - 1
        mem = f"peak {peak:.1f} GiB, plan {plan_gib:.1f} ({err:+.0%})"
        ok = abs(err) <= 0.15
    else:
        peak, err, ok = None, None, None
        mem = f"plan {plan_gib:.3f} GiB (no allocator statistics on CPU)"
    case = f"{label} mb {mb} x {shapes.seq}, compile {'on' if compile else 'off'}, AC {ac}"
    table.add(
        "speed",
        case,
        f"{tps:,.0f} tok/s, {tflops:.3g} TFLOP/s, MFU {mfu:.1%}, {mem}; "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}",
        "plan within 15%" if device.type == "cuda" else "-",
        ok,
        model=label,
        micro_batch=mb,
        compile=compile,
        ac=ac,
        tokens_per_s=tps,
        tflops=tflops,
        mfu=mfu,
        peak_gib=peak,
        plan_gib=plan_gib,
        plan_error=err,
    )
    return SpeedResult(tps, tflops, mfu, peak), model, optimizer


# -- 3. baseline ----------------------------------------------------------------------------------


def hf_tokens_per_s(model_cfg: ModelConfig, device, mb: int, shapes: Shapes) -> float:
    """transformers.OPTForCausalLM with SDPA attention and torch AdamW under bf16 autocast (what
    HF's Trainer does with bf16=True): fp32 weights, same shape, dropout and micro-batch."""
    from transformers import OPTForCausalLM

    from opt_train.engine.precision import autocast
    from opt_train.model.hf import hf_config_from_model_config

    fresh(device)
    cfg = hf_config_from_model_config(model_cfg)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = OPTForCausalLM(cfg)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF chose {model.config._attn_implementation!r} attention, not sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()

    def steps(batches):
        out = []
        for x in batches:
            x = x.to(device, non_blocking=True)
            with autocast("bf16", device.type):
                loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            out.append(loss.detach())
        return [float(v) for v in torch.stack(out).tolist()] if out else []

    dt, _ = timed_run(steps, random_batches(shapes, model_cfg.vocab_size, mb), shapes, device)
    return mb * shapes.seq / dt


def baseline_row(table, shapes, device, label, model_cfg, mb, ours: SpeedResult | None) -> None:
    tried = mb
    while True:
        try:
            hf = hf_tokens_per_s(model_cfg, device, tried, shapes)
            break
        except torch.cuda.OutOfMemoryError:
            pass
        fresh(device)  # out of the except block: its traceback no longer holds the model
        if tried == 1:
            table.add("baseline", f"HF {label}", "out of memory at micro-batch 1", ok=False)
            return
        tried //= 2
    note = "" if tried == mb else f" (micro-batch {tried}: {mb} ran out of memory)"
    if ours is None:
        table.add(
            "baseline", f"HF {label} mb {tried}", f"{hf:,.0f} tok/s{note}", hf_tokens_per_s=hf
        )
        return
    ratio = ours.tokens_per_s / hf
    table.add(
        "baseline",
        f"HF OPTForCausalLM sdpa + AdamW, {label} mb {tried}, bf16 autocast",
        f"{hf:,.0f} tok/s; ours (compile on, AC off, mb {mb}) {ratio:.2f}x{note}",
        ">= 1.5x" if device.type == "cuda" else "-",
        ratio >= 1.5 if device.type == "cuda" else None,
        hf_tokens_per_s=hf,
        ratio=ratio,
    )


# -- 4. checkpoint --------------------------------------------------------------------------------


def checkpoint_row(table, device, label, model, optimizer, directory: Path) -> None:
    """Async saves through the real CheckpointManager: the first pins its staging buffer, the
    second (when the budget allows) reuses it, the steady state of a run."""
    from opt_train.checkpoint.manager import CheckpointManager
    from opt_train.checkpoint.weights import DCPWeights
    from opt_train.config import CheckpointConfig
    from opt_train.parallel.process_groups import DistInfo

    root = Path(tempfile.mkdtemp(prefix="gpu-bench-ckpt-", dir=directory))
    try:
        mgr = CheckpointManager(
            root, CheckpointConfig(keep=1, async_save=True), DistInfo(0, 1, 0, device)
        )
        weights = DCPWeights(model, optimizer)
        saves = []  # (blocked s, visible s, bytes)
        for step in (1, 2):
            if saves and not table.fits(saves[-1][1] + 5):
                break
            t0 = time.perf_counter()
            final = mgr.save(step, weights, {"step": step, "tokens": 0}, "bench: true\n")
            blocked = time.perf_counter() - t0
            mgr.wait()
            visible = time.perf_counter() - t0
            meta = json.loads((final / "meta.json").read_text())
            saves.append((blocked, visible, sum(f["bytes"] for f in meta["files"].values())))
            shutil.rmtree(final)  # one checkpoint on disk at a time (the GPU host's disk)
        mgr.close()
        pinned = _staged_pinned(weights)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    blocked, visible, n = saves[-1]
    gb = n / 1e9
    first = (
        f"first save blocked {saves[0][0]:.2f} s{' (pinning the buffer)' if pinned else ''}"
        if len(saves) > 1
        else "one save only (time budget)"
    )
    table.add(
        "checkpoint",
        f"async save, {label} weights + AdamW ({gb:.2f} GB), staging buffer "
        f"{'pinned' if pinned else 'not pinned'}",
        f"blocked {blocked:.2f} s ({gb / blocked:.3g} GB/s staging; {first}), "
        f"visible after {visible:.1f} s ({gb / visible:.3g} GB/s)",
        ok=None,
        blocked_s=blocked,
        first_blocked_s=saves[0][0],
        visible_s=visible,
        bytes=n,
        pinned=pinned,
    )


def _staged_pinned(weights) -> bool:
    """Whether the writer's kept CPU copy of the state (the staging buffer) is page-locked."""
    cache = getattr(weights.writer(Path(".")), "state_dict_cache", None)
    stack = [cache]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            return x.is_pinned()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return False
