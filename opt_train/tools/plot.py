"""`python -m opt_train.plot RUN_DIR [RUN_DIR ...] -o curves.png`: a run's curves from its
metrics.jsonl, several runs overlaid (one colour each, named in the legend).

Panels, all against tokens seen: training loss with validation loss (event rows such as
spike or rollback as markers on it), learning rate, gradient norm, loss scale, throughput
(tokens/s) and MFU. Headless (matplotlib's Agg backend); reads only the JSON lines it is given
and writes only `-o` (`.png` added when it has no suffix); malformed rows are skipped with a
warning naming file and line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, PercentFormatter  # noqa: E402

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


def draw(run_dirs: list[Path], labels: list[str] | None = None) -> matplotlib.figure.Figure:
    """The figure: one panel per metric, one colour per run."""
    run_dirs = [Path(p) for p in run_dirs]
    labels = labels or _labels(run_dirs)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True)
    axes = axes.ravel()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    event_kinds: dict[str, str] = {}
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        colour = colours[i % len(colours)]
        rows = read_rows(run_dir)
        steps = [r for r in rows if row_kind(r) == "step" and _number(r.get("tokens"))]
        tokens_at = {r["step"]: r["tokens"] for r in steps}
        loss_at = {r["step"]: r["loss"] for r in steps}
        for ax, (key, _, _) in zip(axes, PANELS, strict=True):
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
    handles, names = axes[0].get_legend_handles_labels()
    for event, marker in event_kinds.items():
        (h,) = axes[0].plot([], [], marker=marker, ls="none", color="black", mfc="none")
        handles.append(h)
        names.append(f"event: {event}")
    if handles:
        axes[0].legend(handles, names, fontsize="small")
    fig.tight_layout()
    return fig


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
