"""Tasks in, lm-eval results out: the one evaluation path of the loop and the offline command.

`load_tasks` resolves task and group names through lm-eval's `TaskManager` (its own tasks,
this package's `tasks/` directory when it exists, and a user's `include_path`), builds them
(their data is loaded here) and refuses what cannot run, naming it, before any model work.
`evaluate` then runs lm-eval's `evaluator.evaluate` on them with our model (`harness.OptLM`),
after the same per-task settings and seeds as `lm_eval.simple_evaluate` (num_fewshot,
the few-shot sampler's seed): the scores are those `lm_eval --model hf` gives on an export.
`simple_evaluate` itself is not called because it also records the machine (torch's
collect_env: seconds per call), which the loop pays at every evaluation; the offline command
adds that record itself (opt_train/tools/evaluate.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PACKAGED_TASKS = Path(__file__).resolve().parent / "tasks"  # task YAMLs shipped with opt-train
# lm_eval.simple_evaluate's seeds (python, numpy, torch, few-shot sampler), so that a task that
# draws anything draws what `lm_eval --model hf` draws.
SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}


class TaskError(ValueError):
    """A task that cannot run: unknown, unreadable, its data not loadable, or generative."""


def include_paths(include_path: str | None) -> list[str]:
    """The directories lm-eval searches besides its own tasks: the packaged `tasks/` (the
    `opt_zero_shot` group) and the user's `include_path`."""
    paths = [str(PACKAGED_TASKS)] if PACKAGED_TASKS.is_dir() else []
    if include_path:
        p = Path(include_path).expanduser()
        if not p.is_dir():
            raise TaskError(f"include_path={include_path}: not a directory of task YAMLs")
        paths.append(str(p))
    return paths


def _unreadable_yamls(include_path: str | None) -> list[str]:
    """YAML files under `include_path` that do not parse (lm-eval skips them with a log line,
    so their tasks look unknown). Parsed as plain data: tags such as lm-eval's `!function`
    are accepted and not resolved, so no code from the files runs here."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    bad = []
    for f in sorted(Path(include_path).expanduser().rglob("*.yaml")) if include_path else []:
        try:
            yaml.load(f.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            bad.append(f"{f}: {str(e).splitlines()[0]}")
    return bad


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], defaults: bool):
    """lm-eval's task index over `paths` (and its own tasks when `defaults`), built once per
    process: the loop asks at every evaluation."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def _load(manager, names: list[str], include_path: str | None) -> dict[str, Any]:
    """`manager.load(names)`, or TaskError naming each unknown name (with close matches and
    the YAMLs that do not parse) or the tasks whose data does not load."""
    import difflib

    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        lines = []
        for n in unknown:
            close = difflib.get_close_matches(n, known, n=3)
            lines.append(f"unknown task {n!r}" + (f" (did you mean {close}?)" if close else ""))
        lines += [f"task YAML that does not parse: {b}" for b in _unreadable_yamls(include_path)]
        raise TaskError("; ".join(lines))
    try:
        return manager.load(list(names))
    except Exception as e:  # lm-eval raises what datasets raises: name the tasks with it
        raise TaskError(
            f"tasks {names}: could not be built or their data could not be loaded: "
            f"{type(e).__name__}: {e} (lm-eval's own tasks download their data from the HF hub "
            "once; offline, only cached or local data loads: docs/evaluation.md)"
        ) from e


def load_tasks(
    names: list[str], include_path: str | None = None, num_fewshot: int | None = None
) -> dict[str, Any]:
    """lm-eval's loaded tasks ({"tasks", "groups", "group_map"}) for `names`, with
    `num_fewshot` applied as `simple_evaluate` applies it. Raises TaskError naming the task
    (and the YAML files that failed to parse) for anything that cannot run."""
    if not names:
        raise TaskError("no tasks given: set tasks=[NAME,...] (lm-eval task or group names)")
    paths = tuple(include_paths(include_path))
    loaded = None
    if paths:
        # Our YAMLs alone first: indexing lm-eval's ~15,000 built-in tasks takes tens of
        # seconds, and tasks that need none of them (the tests', a user's) skip it.
        local = _manager(paths, defaults=False)
        if set(names) <= set(local.all_tasks):
            with contextlib.suppress(Exception):  # e.g. a group of lm-eval's own tasks
                loaded = local.load(list(names))
    if loaded is None:
        loaded = _load(_manager(paths, defaults=True), names, include_path)
    for name, task in loaded["tasks"].items():
        if task.get_config("output_type") == "generate_until":
            raise TaskError(
                f"task {name!r} generates text (output_type generate_until); opt-train's lm-eval "
                "model scores log-likelihoods only"
            )
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=SEEDS["fewshot"])
    return loaded


def evaluate(
    lm,
    tasks: list[str],
    include_path: str | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """lm-eval's results dict (`{"results": {task: {"acc,none": ...}}, "samples": ...}`)
    of `tasks` with the lm-eval model `lm`; the same on every rank."""
    from lm_eval.evaluator import evaluate as lm_evaluate

    loaded = load_tasks(tasks, include_path, num_fewshot)
    random.seed(SEEDS["random"])
    np.random.seed(SEEDS["numpy"])
    torch.manual_seed(SEEDS["torch"])
    results = lm_evaluate(
        lm=lm,
        task_dict=loaded,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
    )
    if results is None:  # lm-eval answers only on its rank 0, which every rank is to it
        raise RuntimeError("lm-eval returned no results")
    results["config"] = {"limit": limit, "num_fewshot": num_fewshot, **SEEDS}
    return results


def metric_rows(results: dict[str, Any]) -> dict[str, float]:
    """`downstream/<task>/<metric>` -> value for every numeric metric of every task and group
    (lm-eval's "acc,none" is `acc`; another filter is kept: `acc/<filter>`); stderr left out."""
    row = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if not flt or metric.endswith("_stderr") or isinstance(value, (str, bool)):
                continue
            if isinstance(value, (int, float)):
                name = metric if flt == "none" else f"{metric}/{flt}"
                row[f"downstream/{task}/{name}"] = float(value)
    return row


def run_tokenizer(cfg):
    """The HF tokenizer of the run's training data (its shard manifest's record: GPT-2's files
    or the user's OPT files), the one an export of the run writes."""
    from data_pipeline.shards import read_manifest
    from opt_train.data.loader import resolve_data_path
    from opt_train.model.hf import hf_tokenizer

    path = cfg.data.sources[0].path if cfg.data.sources else cfg.data.path
    record = read_manifest(resolve_data_path(path, cfg.data.cache_dir))["tokenizer"]
    if record.get("name") not in ("gpt2", "opt"):
        raise TaskError(
            f"data {path}: its tokenizer {record.get('name')!r} has no text form; downstream "
            "evaluation needs data tokenized with data.tokenizer gpt2 or opt"
        )
    tok, _ = hf_tokenizer(record, cfg.model.vocab_size, cfg.model.max_positions)
    return tok


def make_lm(model, cfg, device, precision: str, dp_rank: int, dp_size: int, batch_size: int):
    """`harness.OptLM` over `model` with the run's tokenizer and positions."""
    from opt_train.downstream.harness import OptLM

    return OptLM(
        model,
        run_tokenizer(cfg),
        cfg.model.max_positions,
        device,
        precision,
        batch_size,
        dp_rank,
        dp_size,
    )
