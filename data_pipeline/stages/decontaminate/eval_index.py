"""The evaluation side: texts from JSONL files and lm-eval tasks, their n-grams as one index.

Evaluation data must be read whole (a skipped line would let its n-grams into training
unnoticed), so a bad line, a missing text or an unknown task stops the run before any work,
naming the file and line or the task, instead of going to a rejects file as corpus lines do.

An lm-eval task contributes the documents the harness evaluates (`eval_docs`: the test split,
else the validation split), each as the harness formats it: `doc_to_text(doc)`, the target
delimiter, and a gold target (`doc_to_target`; for a multiple-choice task the gold choice's
text, `doc_to_choice(doc)[target]`); one text per gold when a document has several.
"""

from __future__ import annotations

import difflib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.documents import expand_inputs, iter_lines
from data_pipeline.files import atomic_write, atomic_write_json
from data_pipeline.sources import plain
from data_pipeline.stages.decontaminate.ngrams import NgramIndex, text_ngrams

INDEX_FILES = ("hashes.npy", "sets.npy", "index.json")


def _file_task(path: Path) -> str:
    """A JSONL file's default task name: its name without the .jsonl/.gz/.zst suffixes."""
    name = path.name
    for suffix in (".gz", ".zst", ".jsonl", ".ndjson", ".json"):
        name = name.removesuffix(suffix)
    return name


def jsonl_texts(spec: Any, task_field: str) -> Iterator[tuple[str, str]]:
    """(task, text) of every line of the evaluation JSONL files `spec`; ValueError naming
    file:line for a line that is not a JSON object with a string `text`."""
    files = expand_inputs(spec)
    if not files:
        raise FileNotFoundError(f"eval={spec}: no JSONL files")
    for path in files:
        default = _file_task(path)
        for lineno, raw in enumerate(iter_lines(path), start=1):
            if not raw.strip():
                continue
            where = f"eval file {path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{where}: not a JSON line ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f'{where}: expected an object with a string "text"')
            task = obj.get(task_field, default)
            if not isinstance(task, str) or not task:
                raise ValueError(f"{where}: {task_field!r} must be a non-empty string")
            yield task, obj["text"]


def _load_tasks(names: list[str], include_path: Any, include_defaults: bool) -> dict:
    """lm-eval's Task objects for `names` (groups and tags expanded to their tasks)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=plain(include_path), include_defaults=include_defaults)
    for name in names:
        if name not in tm.all_tasks and not Path(name).is_file():
            close = difflib.get_close_matches(name, tm.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" (include_path={include_path})" if include_path else ""
            raise ValueError(f"eval_tasks: unknown lm-eval task {name!r}{where}{hint}")
    try:
        return tm.load(list(names))["tasks"]
    except Exception as e:  # the task's dataset could not be read (offline, missing file)
        raise ValueError(f"eval_tasks={list(names)}: lm-eval could not load them: {e}") from e


def _as_texts(value: Any, choices: list | None) -> list[str]:
    """A doc_to_text / doc_to_target value as text(s): an index picks from the choices."""
    if isinstance(value, list):
        return [t for v in value for t in _as_texts(v, choices)]
    if isinstance(value, int) and not isinstance(value, bool) and choices is not None:
        return [str(choices[value])]
    return [str(value)]


def task_texts(task: Any) -> Iterator[str]:
    """Every evaluated document of one lm-eval task as the harness formats it (module doc)."""
    delim = getattr(task.config, "target_delimiter", " ") or ""
    has_choices = getattr(task.config, "doc_to_choice", None) is not None
    for doc in task.eval_docs:
        choices = task.doc_to_choice(doc) if has_choices else None
        context = " ".join(_as_texts(task.doc_to_text(doc), choices))
        golds = _as_texts(task.doc_to_target(doc), choices)
        for gold in golds or [""]:
            yield f"{context}{delim}{gold}"


def lm_eval_texts(names: list[str], include_path: Any, include_defaults: bool):
    """(task, text) of the lm-eval tasks `names`."""
    for name, task in _load_tasks(names, include_path, include_defaults).items():
        for text in task_texts(task):
            yield name, text


def build(cfg: Any) -> tuple[NgramIndex, list[str], dict[str, dict]]:
    """The index of every evaluation text of `cfg` (eval files, then eval_tasks), the task
    names by number, and per task: texts, texts shorter than `ngram` words (they cannot
    match), distinct n-grams."""
    sources = []
    if cfg.eval is not None:
        sources.append(jsonl_texts(cfg.eval, cfg.eval_task_field))
    if cfg.eval_tasks:
        sources.append(lm_eval_texts(list(cfg.eval_tasks), cfg.include_path, cfg.include_defaults))
    per_task: dict[str, list[np.ndarray]] = {}
    stats: dict[str, dict] = {}
    for texts in sources:
        for task, text in texts:
            st = stats.setdefault(task, {"texts": 0, "short_texts": 0, "ngrams": 0})
            _, h = text_ngrams(text, cfg.ngram)
            st["texts"] += 1
            st["short_texts"] += not len(h)
            per_task.setdefault(task, []).append(h)
    names = sorted(per_task)
    arrays = [np.unique(np.concatenate(per_task[t])) for t in names]
    for t, a in zip(names, arrays, strict=True):
        stats[t]["ngrams"] = len(a)
    return NgramIndex.build(arrays), names, stats


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def save(directory: Path, index: NgramIndex, names: list[str], stats: dict) -> None:
    """The index as two .npy arrays and a JSON record (no pickle: loading runs no code)."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "hashes.npy", _npy(index.hashes))
    atomic_write(directory / "sets.npy", _npy(index.sets))
    meta = {
        "tasks": names,
        "task_sets": [list(s) for s in index.task_sets],
        "stats": stats,
        "ngrams": len(index.hashes),
    }
    atomic_write_json(directory / "index.json", meta)


def load(directory: Path) -> tuple[NgramIndex, list[str]]:
    """The saved index (arrays memory-mapped: every task process shares their pages)."""
    meta = json.loads((directory / "index.json").read_text())
    hashes = np.load(directory / "hashes.npy", mmap_mode="r", allow_pickle=False)
    sets = np.load(directory / "sets.npy", mmap_mode="r", allow_pickle=False)
    return NgramIndex(hashes, sets, [tuple(s) for s in meta["task_sets"]]), meta["tasks"]
