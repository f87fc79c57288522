"""The scorecard: published zero-shot accuracies of the released OPT checkpoints
(`opt_reference.json` beside this file, each number with its source; docs/opt-zero-shot.md),
looked up by the run's `model.name` (`opt-125m` ... `opt-175b`), task and lm-eval metric key
(`acc,none`), and printed beside a run's own results.

The file is JSON read with `json` (no code runs from it) and checked on load: an entry with an
unknown source, a value outside [0, 1] or a duplicate (model, task, metric) is an error naming
the file, the entry's index and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REFERENCE_FILE = Path(__file__).with_name("opt_reference.json")
ENTRY_KEYS = ("model", "task", "metric", "value", "source", "file")
SOURCE_KEYS = ("short", "what", "repository", "commit", "url", "harness", "settings")


@dataclass(frozen=True)
class Reference:
    """One published number: `value` for `model` on `task` under lm-eval's `metric` key."""

    model: str
    task: str
    metric: str
    value: float
    source: str  # the short name of the source, for tables and legends
    url: str  # where the number is written (for a repository file: at its commit)


def _bad(path: Path, where: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {where}: {msg}")


def _check_sources(path: Path, sources) -> dict[str, dict]:
    if not isinstance(sources, dict) or not sources:
        raise _bad(path, "sources", "must be a non-empty object {name: {...}}")
    for name, src in sources.items():
        missing = [k for k in SOURCE_KEYS if not isinstance(src, dict) or not src.get(k)]
        if missing:
            raise _bad(path, f"sources.{name}", f"missing or empty {', '.join(missing)}")
    return sources


def _entry(path: Path, i: int, e, sources: dict[str, dict]) -> Reference:
    where = f"entries[{i}]"
    if not isinstance(e, dict) or sorted(e) != sorted(ENTRY_KEYS):
        raise _bad(path, where, f"must be an object with exactly the keys {', '.join(ENTRY_KEYS)}")
    for key in ("model", "task", "metric", "source", "file"):
        if not isinstance(e[key], str) or not e[key]:
            raise _bad(path, f"{where}.{key}", f"must be a non-empty string, got {e[key]!r}")
    value = e["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _bad(path, f"{where}.value", f"must be a fraction in [0, 1], got {value!r}")
    src = sources.get(e["source"])
    if src is None:
        raise _bad(
            path, f"{where}.source", f"{e['source']!r} is not one of {', '.join(sorted(sources))}"
        )
    url = f"https://github.com/{src['repository']}/blob/{src['commit']}/{e['file']}"
    return Reference(e["model"], e["task"], e["metric"], float(value), src["short"], url)


def load_reference(path: Path = REFERENCE_FILE) -> tuple[dict[str, dict], list[Reference]]:
    """The file's sources (by name) and its numbers, checked (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the reference table: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise _bad(path, "entries", "must be a list of {model, task, metric, value, source}")
    sources = _check_sources(path, data.get("sources"))
    refs, seen = [], {}
    for i, e in enumerate(data["entries"]):
        ref = _entry(path, i, e, sources)
        key = (ref.model, ref.task, ref.metric)
        if key in seen:
            raise _bad(path, f"entries[{i}]", f"{key} is already given by entries[{seen[key]}]")
        seen[key] = i
        refs.append(ref)
    return sources, refs


@cache
def _shipped() -> dict[str, dict[tuple[str, str], Reference]]:
    by_model: dict[str, dict[tuple[str, str], Reference]] = {}
    for ref in load_reference()[1]:
        by_model.setdefault(ref.model, {})[(ref.task, ref.metric)] = ref
    return by_model


def reference_models() -> list[str]:
    """The model names the shipped table has numbers for, in its order (smallest first)."""
    return list(_shipped())


def references_for(model_name: str | None) -> dict[tuple[str, str], Reference]:
    """The shipped numbers of the released checkpoint named like the run's `model.name`
    (`opt-1.3b`; an HF id `facebook/opt-1.3b` works too), by (task, metric). Empty for a model
    without published numbers (the tiny test models, a custom size)."""
    if not model_name:
        return {}
    return dict(_shipped().get(model_name.lower().rpartition("/")[2], {}))


def lookup(model_name: str | None, task: str, metric: str) -> Reference | None:
    """The published number for one (model, task, lm-eval metric key), or None."""
    return references_for(model_name).get((task, metric))


def _metrics(task_results: dict) -> list[tuple[str, float]]:
    """A task's scores from lm-eval's results: numeric values whose key is not a stderr."""
    return [
        (k, float(v))
        for k, v in task_results.items()
        if "_stderr" not in k
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and "," in k  # lm-eval's "<metric>,<filter>" keys; "sample_len" and the like are not
    ]


def format_reference(results: dict, model_name: str) -> str:
    """A table of each task and metric in lm-eval's `results` (`{"results": {task: {"acc,none":
    ...}}}`): ours, the published number of the released checkpoint named `model_name` and the
    difference, with the source's short name; then each source's URL. One line saying so when
    the table has no numbers for `model_name`."""
    refs = references_for(model_name)
    if not refs:
        return (
            f"no published OPT reference for model {model_name!r} (the scorecard has "
            f"{', '.join(reference_models())}; docs/opt-zero-shot.md)"
        )
    rows = [("task", "metric", "ours", "OPT ref", "diff", "source")]
    used: dict[str, str] = {}
    for task, task_results in sorted((results.get("results") or {}).items()):
        for metric, ours in _metrics(task_results if isinstance(task_results, dict) else {}):
            ref = refs.get((task, metric))
            if ref is None:
                rows.append((task, metric, f"{ours:.4f}", "-", "-", "no published number"))
                continue
            used.setdefault(ref.source, ref.url)
            rows.append(
                (
                    task,
                    metric,
                    f"{ours:.4f}",
                    f"{ref.value:.4f}",
                    f"{ours - ref.value:+.4f}",
                    ref.source,
                )
            )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"OPT reference: {model_name}, the released checkpoint (docs/opt-zero-shot.md)"]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    lines += [f"{name}: {url}" for name, url in used.items()]
    return "\n".join(lines)
