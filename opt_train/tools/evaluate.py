"""`python -m opt_train.eval RUN_DIR [key=value ...]`: lm-evaluation-harness tasks on a
checkpoint (docs/evaluation.md).

The newest complete checkpoint of RUN_DIR (or `checkpoint=PATH`) is read directly from its
sharded DCP files into the model built as the trainer builds it (`parallelize`: FSDP2 over
the data-parallel ranks, tensor parallel over `tp`), at any world size: one process, or
`torchrun --nproc_per_node=N -m opt_train.eval ...`. No HF export is needed. The tasks are
checked (names, YAMLs, data) before the model is built. Rank 0 prints lm-eval's table and
writes `output` (lm-eval's results JSON); nothing in RUN_DIR is changed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from data_pipeline.config_limits import AT_LEAST_1, OneOf, Range, check_limits
from data_pipeline.files import atomic_write_json
from data_pipeline.ownership import NotOursError, check_output
from opt_train.config import JOB_LIMITS, JobConfig, ParallelConfig
from opt_train.downstream.run import TaskError, evaluate, load_tasks, make_lm

log = logging.getLogger(__name__)

EVAL_LIMITS = {
    "precision": OneOf((None, *JOB_LIMITS["precision"].choices)),
    "batch_size": Range(1, null=True),
    "limit": Range(0, lo_open=True, null=True),
    "num_fewshot": Range(0, null=True),
    "tp": AT_LEAST_1,
    "device": OneOf(("auto", "cpu", "cuda")),
}
# What makes an existing `output` file ours to replace: lm-eval's results with our record.
RECORD_KEY = "opt_train"


@dataclass
class EvalConfig:
    """The command's keys; unset ones take the run's `downstream` section (and precision)."""

    tasks: list[str] = field(default_factory=list)  # task or group names; []: the run's
    include_path: Optional[str] = None  # a directory of extra task YAMLs
    limit: Optional[float] = None  # documents per task (a fraction if < 1)
    num_fewshot: Optional[int] = None  # None: each task's own
    batch_size: Optional[int] = None  # sequences per forward
    precision: Optional[str] = None  # None: the run's (auto resolves on this device)
    output: Optional[str] = None  # lm-eval's results JSON
    log_samples: bool = False  # per-document requests and scores into `output` ("samples")
    checkpoint: Optional[str] = None  # a checkpoint dir; None: the newest complete one
    tp: int = 1  # tensor-parallel degree; the other ranks are data-parallel
    device: str = "auto"
    bootstrap_iters: int = 100_000  # lm-eval's stderr bootstrap (0: none)

    def __post_init__(self) -> None:
        check_limits(self, "", EVAL_LIMITS)


def parse_args(argv: list[str]) -> tuple[Path, EvalConfig]:
    """RUN_DIR and key=value overrides; a bad key or value stops with its name."""
    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        raise SystemExit(f"usage: python -m opt_train.eval RUN_DIR [key=value ...]\n{__doc__}")
    dotlist = []
    keys = [f.name for f in fields(EvalConfig)]
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq:
            raise SystemExit(f"error: {arg!r}: expected key=value")
        if key not in keys:
            raise SystemExit(f"error: {arg!r}: unknown key {key!r}; the keys: {', '.join(keys)}")
        if key == "tasks" and not value.startswith("["):
            value = f"[{value}]"  # tasks=hellaswag: one name
        dotlist.append(f"{key}={value}")
    try:
        raw = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(dotlist))
        cfg: EvalConfig = OmegaConf.to_object(raw)
    except Exception as e:
        raise SystemExit(f"error: {e.__cause__ or e}".splitlines()[0]) from None
    return Path(argv[0]), cfg


def run_config(ckpt: Path) -> JobConfig:
    """The job config the checkpoint was saved with (its config.yaml)."""
    raw = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(ckpt / "config.yaml"))
    return OmegaConf.to_object(raw)


def build_model(cfg: JobConfig, dist_info, tp: int, precision: str, ckpt: Path):
    """(model, dp_rank, dp_size): the OPT module on this rank, parallelized as the trainer
    does it (without activation checkpointing or compile: forward only), with the weights of
    `ckpt` read through DCP into this rank's shards (no code from the checkpoint runs)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from opt_train.checkpoint.trusted import load_dcp
    from opt_train.model.opt import OPT
    from opt_train.parallel.apply import parallelize
    from opt_train.parallel.dims import ParallelDims

    with torch.device("meta"):  # every weight is read from the checkpoint: nothing to init
        model = OPT(cfg.model)
    dp_rank, dp_size, group = 0, 1, None
    if dist_info.world > 1:
        dims = ParallelDims.from_config(ParallelConfig(tp=tp), dist_info.world)
        dims.check_model(cfg.model)
        mesh, dp_mesh = dims.build_mesh(dist_info.device.type)
        parallelize(model, dims, mesh, precision, "off", compile=False)
        dp_rank, dp_size = dp_mesh.get_local_rank(), dims.dp
        group = dist.new_group(backend="gloo")  # DCP's planning, as the checkpoint manager
    elif tp != 1:
        raise SystemExit(f"error: tp={tp} needs {tp} ranks or a multiple (torchrun)")
    model.to_empty(device=dist_info.device)
    state = {"model": get_model_state_dict(model)}
    load_dcp(state, ckpt, group)
    set_model_state_dict(model, state["model"])
    return model.eval(), dp_rank, dp_size


def evaluate_run(run_dir: Path, ecfg: EvalConfig) -> dict[str, Any] | None:
    """Evaluate and report (rank 0); returns lm-eval's results on rank 0, None elsewhere."""
    from opt_train.checkpoint.layout import FORMAT, find_checkpoint
    from opt_train.engine.precision import resolve_precision
    from opt_train.parallel.process_groups import init_distributed, shutdown

    ckpt = find_checkpoint(ecfg.checkpoint or run_dir)
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta["format"] != FORMAT:
        raise SystemExit(f"error: {ckpt}: {meta['format']} checkpoints are not read; only {FORMAT}")
    cfg = run_config(ckpt)
    tasks = ecfg.tasks or cfg.downstream.tasks
    include_path = ecfg.include_path or cfg.downstream.include_path
    num_fewshot = ecfg.num_fewshot if ecfg.num_fewshot is not None else cfg.downstream.num_fewshot
    limit = ecfg.limit if ecfg.limit is not None else cfg.downstream.limit
    if ecfg.output:
        check_output(ecfg.output, "output", _our_results, "opt-train evaluation output")
    load_tasks(tasks, include_path, num_fewshot)  # before any model work: names, YAMLs, data
    dist_info = init_distributed(ecfg.device, cfg.parallel.timeout_s)
    clean = False
    try:
        precision = resolve_precision(ecfg.precision or cfg.precision, dist_info.device).precision
        model, dp_rank, dp_size = build_model(cfg, dist_info, ecfg.tp, precision, ckpt)
        # As the engines run it: FSDP2's policy casts the weights; one process autocasts.
        autocast = "fp32" if dist_info.world > 1 else precision
        batch = ecfg.batch_size or cfg.downstream.batch_size
        lm = make_lm(model, cfg, dist_info.device, autocast, dp_rank, dp_size, batch)
        results = evaluate(
            lm, tasks, include_path, limit, num_fewshot, ecfg.log_samples, ecfg.bootstrap_iters
        )
        clean = True
    finally:
        shutdown(clean)
    if not dist_info.is_main:
        return None
    results["config"].update(
        {
            RECORD_KEY: {"run_dir": str(run_dir), "checkpoint": str(ckpt), "step": meta["step"]},
            "model": cfg.model.name,
            "precision": precision,
            "batch_size": batch,
            "world": dist_info.world,
            "tp": ecfg.tp,
        }
    )
    report(results, cfg.model.name)
    if ecfg.output:
        from lm_eval.loggers.utils import add_env_info

        add_env_info(results)  # what `lm_eval --output_path` records of the machine
        check_output(ecfg.output, "output", _our_results, "opt-train evaluation output")
        atomic_write_json(ecfg.output, results)
    return results


def _our_results(path: Path) -> bool:
    try:
        return RECORD_KEY in json.loads(path.read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return False


def report(results: dict[str, Any], model_name: str) -> None:
    """lm-eval's table (and its groups'), then the released OPT models' accuracies beside
    ours where opt_train.downstream.reference knows the size."""
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    try:
        from opt_train.downstream import reference
    except ImportError:  # the scorecard's data is not installed with this version
        return
    print(reference.format_reference(results, model_name))


def main(argv: list[str] | None = None) -> None:
    """`python -m opt_train.eval RUN_DIR [tasks=[...]] [include_path=DIR] [output=X.json] ...`"""
    run_dir, ecfg = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from opt_train.checkpoint.trusted import CorruptCheckpoint

    try:
        evaluate_run(run_dir, ecfg)
    except (TaskError, NotOursError, FileNotFoundError, CorruptCheckpoint) as e:
        raise SystemExit(f"error: {e}") from None
