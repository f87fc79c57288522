"""`python -m opt_train.plot RUN_DIR [RUN_DIR ...] -o curves.png`: a run's curves from its
metrics.jsonl, several runs overlaid (one colour each, named in the legend).

Panels, all against tokens seen: training loss with validation loss (event rows such as
spike or rollback as markers on it), learning rate, gradient norm, loss scale, throughput
(tokens/s) and MFU. Runs with downstream rows (`downstream/<task>/<metric>`, the `downstream`
config group) get one more panel per task below them: each metric a line style, and the
published score of the released OPT checkpoint named by the run's `model.name` (its
config.yaml) as a grey horizontal line labelled with its source (docs/opt-zero-shot.md).
Headless (matplotlib's Agg backend); reads only the files of the runs it is given and writes
only `-o` (`.png` added when it has no suffix); malformed rows are skipped with a warning
naming file and line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, PercentFormatter  # noqa: E402

from opt_train.downstream.reference import references_for  # noqa: E402
from opt_train.train.metric_rows import row_kind  # noqa: E402
from opt_train.train.run_files import row_step  # noqa: E402

PANELS = [  # (metric, title, log base of the y axis or None)
    ("loss", "loss (dashed: validation)", None),
    ("lr", "learning rate", None),
    ("grad_norm", "gradient norm", None),
    ("loss_scale", "loss scale", 2),  # fp16's scale moves by factors of 2
    ("tokens_per_s", "throughput (tokens/s)", None),
    ("mfu", "MFU", None),
]
EVENT_MARKERS = "vox^sD*"
DOWNSTREAM = "downstream/"  # metrics.jsonl keys downstream/<task>/<metric>, metric lm-eval's
METRIC_STYLES = ["-", "--", ":", "-."]  # acc, acc_norm, ...: one style each, in every panel
PANEL_COLUMNS = 3


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl`. A torn last line of a killed run is left out;
    any other line that is not a JSON object with an integer `step` is skipped with a warning
    naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (is {run_dir} a run directory?)")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
            if i == len(lines):
                continue  # a killed run's torn last line
        if row_step(row) is None:
            print(
                f"warning: {path}:{i}: not a metrics row (a JSON object with an integer "
                "step); skipped",
                file=sys.stderr,
            )
            continue
        rows.append(row)
    return rows


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _si(x: float) -> str:
    """25k, 1.5M, 300B: token counts as people say them."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{suffix}"
    return f"{x:g}"


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) < len(names):  # same leaf name: show the parent too
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in run_dirs]
    return names


def image_path(out: Path) -> tuple[Path, str]:
    """The file to write and its format: `out` with its suffix's format, `out.png` when it has
    no suffix; a suffix matplotlib cannot write is a clear error."""
    out = Path(out)
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    fmt = out.suffix[1:].lower()
    known = plt.gcf().canvas.get_supported_filetypes()
    plt.close()
    if fmt not in known:
        raise SystemExit(
            f"error: -o {out}: matplotlib cannot write {out.suffix!r} images; use one of "
            + ", ".join(f".{k}" for k in sorted(known))
        )
    return out, fmt


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Draw the runs' curves into `out` (any format matplotlib knows by suffix; PNG, as
    `out.png`, without one). Returns the file written."""
    out, fmt = image_path(out)
    fig = draw(run_dirs, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")  # a half-drawn file is never `out`
    fig.savefig(tmp, dpi=100, format=fmt)
    plt.close(fig)
    tmp.replace(out)
    return out


def downstream_series(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The downstream scores in `rows`, as task -> lm-eval metric key -> [(step, value)];
    stderr keys are left out."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        for key, value in r.items():
            if not key.startswith(DOWNSTREAM) or not _number(value) or "_stderr" in key:
                continue
            task, _, metric = key[len(DOWNSTREAM) :].rpartition("/")
            if task and metric:
                series.setdefault(task, {}).setdefault(metric, []).append((r["step"], value))
    return series


def run_model_name(run_dir: Path) -> str | None:
    """`model.name` from the run's config.yaml, or None where there is none to read."""
    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    return name if isinstance(name, str) else None


def _metric_label(metric: str) -> str:
    name, _, filt = metric.partition(",")
    return name if filt in ("", "none") else metric


def draw(run_dirs: list[Path], labels: list[str] | None = None) -> matplotlib.figure.Figure:
    """The figure: one panel per metric, one colour per run; then one panel per downstream
    task when any run has downstream rows."""
    run_dirs = [Path(p) for p in run_dirs]
    labels = labels or _labels(run_dirs)
    runs = [read_rows(d) for d in run_dirs]
    series = [downstream_series(rows) for rows in runs]
    tasks = sorted({t for s in series for t in s})
    n_rows = 2 + math.ceil(len(tasks) / PANEL_COLUMNS)
    fig, axes = plt.subplots(n_rows, PANEL_COLUMNS, figsize=(15, 4 * n_rows), sharex=True)
    axes = axes.ravel()
    task_axes = dict(zip(tasks, axes[len(PANELS) :], strict=False))
    for ax in axes[len(PANELS) + len(tasks) :]:
        ax.remove()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    event_kinds: dict[str, str] = {}
    drawn_refs: set[tuple[str, str, str]] = set()
    for i, (run_dir, rows, label) in enumerate(zip(run_dirs, runs, labels, strict=True)):
        colour = colours[i % len(colours)]
        tokens_at = _draw_curves(axes, rows, colour, label, event_kinds)
        if series[i]:
            model = run_model_name(run_dir)
            _draw_downstream(task_axes, series[i], tokens_at, colour, label, model, drawn_refs)
    _finish_curves(axes[: len(PANELS)], event_kinds)
    for task, ax in task_axes.items():
        ax.set_title(f"{task} (downstream)")
        ax.grid(alpha=0.3)
        ax.set_xlabel("tokens")
        ax.tick_params(labelbottom=True)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def _draw_curves(axes, rows: list[dict], colour: str, label: str, event_kinds: dict) -> dict:
    """One run's training panels; returns its tokens seen by step."""
    steps = [r for r in rows if row_kind(r) == "step" and _number(r.get("tokens"))]
    tokens_at = {r["step"]: r["tokens"] for r in steps}
    loss_at = {r["step"]: r["loss"] for r in steps}
    for ax, (key, _, _) in zip(axes, PANELS, strict=False):
        pts = [(r["tokens"], r[key]) for r in steps if _number(r.get(key))]
        if pts:
            ax.plot(*zip(*pts, strict=True), color=colour, lw=1.2, label=label)
    evals = [
        (tokens_at[r["step"]], r["val_loss"])
        for r in rows
        if row_kind(r) == "eval" and _number(r.get("val_loss")) and r["step"] in tokens_at
    ]
    if evals:
        axes[0].plot(*zip(*evals, strict=True), color=colour, ls="--", marker=".", lw=1.2)
    for r in rows:
        if row_kind(r) != "event" or r["step"] not in tokens_at or r["event"] == "goodput":
            continue  # goodput rows are a ledger, not a mark on the loss curve
        marker = event_kinds.setdefault(
            r["event"], EVENT_MARKERS[len(event_kinds) % len(EVENT_MARKERS)]
        )
        y = r.get("loss", loss_at.get(r["step"]))
        if _number(y):
            axes[0].plot(
                tokens_at[r["step"]], y, marker=marker, color=colour, ms=9, mfc="none", mew=1.5
            )
    return tokens_at


def _draw_downstream(task_axes, series, tokens_at, colour, label, model, drawn_refs) -> None:
    """One run's downstream scores against tokens, and the reference of its model size (one
    grey line per (model, task, metric), however many runs share it)."""
    refs = references_for(model)
    for task, metrics in series.items():
        ax = task_axes[task]
        for j, (metric, pts) in enumerate(sorted(metrics.items())):
            style = METRIC_STYLES[j % len(METRIC_STYLES)]
            xy = [(tokens_at[s], v) for s, v in pts if s in tokens_at]
            if xy:
                ax.plot(
                    *zip(*xy, strict=True),
                    color=colour,
                    ls=style,
                    marker="o",
                    ms=3,
                    lw=1.2,
                    label=f"{label} {_metric_label(metric)}",
                )
            ref = refs.get((task, metric))
            if ref is None or (ref.model, task, metric) in drawn_refs:
                continue
            drawn_refs.add((ref.model, task, metric))
            ax.axhline(
                ref.value,
                color="0.4",
                ls=style,
                lw=1,
                label=f"{ref.model} {_metric_label(metric)}: {ref.source}",
            )


def _finish_curves(axes, event_kinds: dict[str, str]) -> None:
    """Titles, scales, the x axis and the legend of the training panels."""
    for ax, (key, title, log_base) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if log_base and ax.has_data():
            ax.set_yscale("log", base=log_base)
        if key == "mfu":
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes[0].xaxis.set_major_formatter(FuncFormatter(lambda x, _: _si(x)))  # x is shared
    for ax in axes[3:]:
        ax.set_xlabel("tokens")
        ax.tick_params(labelbottom=True)  # with downstream panels below, not the bottom row
    handles, names = axes[0].get_legend_handles_labels()
    for event, marker in event_kinds.items():
        (h,) = axes[0].plot([], [], marker=marker, ls="none", color="black", mfc="none")
        handles.append(h)
        names.append(f"event: {event}")
    if handles:
        axes[0].legend(handles, names, fontsize="small")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m opt_train.plot",
        description="Draw runs' training curves from their metrics.jsonl into one image.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("-o", "--output", type=Path, default=Path("curves.png"))
    p.add_argument("--labels", nargs="+", help="legend names, one per RUN_DIR")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.run_dirs):
        p.error(f"--labels: {len(args.labels)} names for {len(args.run_dirs)} run directories")
    print(plot_runs(args.run_dirs, args.output, args.labels))


if __name__ == "__main__":
    sys.exit(main())
