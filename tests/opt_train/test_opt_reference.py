"""OPT's zero-shot suite and its scorecard: the task group as lm-eval reads it, the shipped
reference numbers with their sources, the table printed beside a run's results, and the
downstream panels of `opt_train.plot` with the reference of the run's model size."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from opt_train.downstream import reference
from opt_train.downstream.reference import format_reference, load_reference, lookup
from opt_train.tools.plot import PANELS, draw, plot_runs
from tests.opt_train.conftest import REPO

TASKS_DIR = Path(reference.__file__).with_name("tasks")
DOC = REPO / "docs" / "opt-zero-shot.md"
# The paper's 16 tasks (arXiv 2205.01068, section 3.1), as lm-evaluation-harness 0.4 names them.
PAPER_TASKS = [
    "hellaswag",
    "storycloze_2016",
    "piqa",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "wsc273",
    "winogrande",
    "boolq",
    "cb",
    "copa",
    "rte",
    "wic",
    "wsc",
    "multirc",
    "record",
]


def test_opt_zero_shot_expands_to_the_papers_16_tasks_and_the_doc_names_their_data(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    # Index only: the configs are read, no task is built and no dataset is fetched. lm-eval's
    # own tasks come from the folders that define the suite's 16, as they do among all its
    # folders (indexing every one of them takes 10-20 s).
    lm_eval_tasks = Path(lm_eval.tasks.__file__).parent
    folders = ["hellaswag", "storycloze", "piqa", "arc", "openbookqa", "wsc273", "winogrande"]
    paths = [lm_eval_tasks / f for f in [*folders, "super_glue", "glue"]]
    index = TaskManager(include_path=[*paths, TASKS_DIR], include_defaults=False).task_index
    group = index["opt_zero_shot"]
    assert group.kind.name == "GROUP" and group.yaml_path.parent == TASKS_DIR
    assert group.cfg["task"] == PAPER_TASKS
    assert group.cfg["aggregate_metric_list"] == [
        {"metric": "acc", "aggregation": "mean", "weight_by_size": False}
    ]
    doc = DOC.read_text()
    for name in PAPER_TASKS:
        task = index[name]
        # lm-eval's own task (not a copy of ours), a single task rather than a group or tag.
        assert task.kind.name == "TASK" and lm_eval_tasks in task.yaml_path.parents, name
        assert "num_fewshot" not in task.cfg, name  # zero-shot, as the paper and scorecard
        # The doc's row for the task names the dataset lm-eval loads for it.
        row = re.search(rf"^\| `{name}` \|.*$", doc, re.M)
        assert row and f"`{task.cfg['dataset_path']}`" in row.group(0), name
    assert "manual" in re.search(r"^\| `storycloze_2016` \|.*$", doc, re.M).group(0)


def test_every_shipped_number_names_its_source_a_released_size_and_a_suite_task():
    sources, refs = load_reference()
    # 8 sizes x (piqa, arc_easy, arc_challenge: acc and acc_norm; winogrande, wsc: acc), and
    # OPT-175B's 16 (the same plus hellaswag, openbookqa, boolq, copa, rte, wic).
    assert len(refs) == 8 * 8 + 16
    for name, src in sources.items():
        assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]) and src["commit"] in src["url"], name
    for ref in refs:
        assert (REPO / "conf" / "model" / f"{ref.model}.yaml").is_file(), ref
        assert ref.task in PAPER_TASKS and ref.metric in ("acc,none", "acc_norm,none"), ref
        src = next(s for s in sources.values() if s["short"] == ref.source)
        assert ref.url.startswith(f"https://github.com/{src['repository']}/blob/{src['commit']}/")
    # Spot checks against the published README tables (percentages, 2 decimals).
    for model, task, metric, pct in [
        ("opt-125m", "arc_easy", "acc,none", 43.52),
        ("opt-125m", "winogrande", "acc,none", 50.28),
        ("opt-13b", "arc_challenge", "acc_norm,none", 35.75),
        ("opt-175b", "hellaswag", "acc,none", 59.16),  # mdtable.txt: 0.592
    ]:
        assert round(lookup(model, task, metric).value * 100, 2) == pct
    assert lookup("facebook/opt-125m", "arc_easy", "acc,none").value == pytest.approx(0.4352, 1e-4)
    assert lookup("opt-125m", "hellaswag", "acc,none") is None  # no published run: left out
    assert lookup("opt-175b", "multirc", "acc,none") is None  # another metric: left out
    assert lookup("opt-tiny", "arc_easy", "acc,none") is None


def test_the_scorecard_doc_shows_every_shipped_number():
    cells, columns = {}, []
    for line in DOC.read_text().splitlines():  # one table per source, one row per model
        row = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| model | "):
            columns = row
        elif line.startswith("| opt-"):
            cells.update({(row[0], col): v for col, v in zip(columns, row, strict=True)})
    refs = load_reference()[1]
    for ref in refs:
        column = f"`{ref.task}` {ref.metric.split(',')[0]}"
        assert cells[(ref.model, column)] == f"{ref.value * 100:.2f}", ref
    assert sum(v != "-" for (_, col), v in cells.items() if col != "model") == len(refs)


def test_format_reference_prints_ours_the_reference_the_difference_and_the_source():
    results = {
        "results": {
            "arc_easy": {
                "alias": "arc_easy",
                "acc,none": 0.41,
                "acc_stderr,none": 0.01,
                "acc_norm,none": 0.5,
                "acc_norm_stderr,none": "N/A",
            },
            "hellaswag": {"acc,none": 0.3},
        }
    }
    out = format_reference(results, "opt-125m")
    arc = lookup("opt-125m", "arc_easy", "acc,none")
    line = next(x for x in out.splitlines() if x.startswith("arc_easy") and " acc,none " in x)
    assert line.split() == [
        "arc_easy",
        "acc,none",
        "0.4100",
        f"{arc.value:.4f}",
        f"{0.41 - arc.value:+.4f}",
        *arc.source.split(),
    ]
    norm = next(x for x in out.splitlines() if "acc_norm,none" in x)
    assert f"{0.5 - lookup('opt-125m', 'arc_easy', 'acc_norm,none').value:+.4f}" in norm
    assert re.search(r"^hellaswag +acc,none +0\.3000 +- +- +no published number$", out, re.M)
    assert "stderr" not in out and "alias" not in out
    assert f"{arc.source}: {arc.url}" in out
    unknown = format_reference(results, "opt-tiny")
    assert "opt-tiny" in unknown and "opt-125m" in unknown and len(unknown.splitlines()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["entries"][3].update(value=43.52), "entries[3].value: must be a fraction"),
        (lambda d: d["entries"][0].update(source="paper"), "entries[0].source: 'paper' is not"),
        (lambda d: d["entries"].append(dict(d["entries"][1])), "is already given by entries[1]"),
        (lambda d: d["entries"][2].pop("file"), "entries[2]: must be an object with exactly"),
    ],
)
def test_a_bad_reference_file_is_an_error_naming_the_file_and_the_entry(tmp_path, change, message):
    data = json.loads(reference.REFERENCE_FILE.read_text())
    change(data)
    bad = tmp_path / "ref.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        load_reference(bad)
    assert str(err.value).startswith(f"{bad}: ") and message in str(err.value)


def _run(run_dir: Path, model: str, downstream: dict[int, dict] | None) -> Path:
    """A run directory as training writes it: config.yaml naming the model, and metrics.jsonl
    with a step row per step (256 tokens each) and the downstream callback's rows."""
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"model:\n  name: {model}\n  n_layers: 2\n")
    rows = []
    for step in range(1, 5):
        rows.append(
            {"step": step, "loss": 6 - step, "lr": 1e-3, "grad_norm": 1.0, "loss_scale": 1.0,
             "tokens": 256 * step, "tokens_per_s": 1e4, "mfu": 0.1}
        )  # fmt: skip
        if downstream and step in downstream:
            rows.append({"step": step, **downstream[step], "downstream_time_s": 0.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _png(path: Path) -> tuple[tuple[int, int], int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size, len(im.convert("L").getcolors(1 << 16))


def test_plot_draws_downstream_accuracy_against_the_reference_of_the_runs_size(tmp_path):
    scores = {
        s: {
            "downstream/arc_easy/acc,none": 0.25 + 0.05 * s,
            "downstream/arc_easy/acc_stderr,none": 0.01,
            "downstream/arc_easy/acc_norm,none": 0.3,
            "downstream/hellaswag/acc,none": 0.26,
        }
        for s in (2, 4)
    }
    a = _run(tmp_path / "a", "opt-125m", scores)
    b = _run(tmp_path / "b", "opt-125m", scores)
    png = plot_runs([a, b], tmp_path / "curves.png")
    size, colours = _png(png)
    assert size == (1500, 1200) and colours > 50  # one more row of panels, drawn
    fig = draw([a, b])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [t for _, t, _ in PANELS] + ["arc_easy (downstream)", "hellaswag (downstream)"]
    arc = fig.axes[len(PANELS)]
    acc, norm = (
        lookup("opt-125m", "arc_easy", "acc,none"),
        lookup("opt-125m", "arc_easy", "acc_norm,none"),
    )
    lines = {line.get_label(): line for line in arc.get_lines()}
    # Each run's two metrics against tokens (the stderr left out); each reference once, flat.
    assert list(lines["a acc"].get_xdata()) == [512, 1024]
    assert list(lines["a acc"].get_ydata()) == pytest.approx([0.35, 0.45])
    assert {"a acc", "a acc_norm", "b acc", "b acc_norm"} <= set(lines)
    ref_line = lines[f"opt-125m acc: {acc.source}"]
    assert list(ref_line.get_ydata()) == [acc.value, acc.value]
    assert list(lines[f"opt-125m acc_norm: {norm.source}"].get_ydata()) == [norm.value] * 2
    assert len(arc.get_lines()) == 6
    legend = [t.get_text() for t in arc.get_legend().get_texts()]
    assert f"opt-125m acc: {acc.source}" in legend
    hella = fig.axes[len(PANELS) + 1]
    assert [line.get_label() for line in hella.get_lines()] == ["a acc", "b acc"]  # none known


def test_rows_without_downstream_keys_plot_as_before(tmp_path):
    run = _run(tmp_path / "run", "opt-125m", None)
    size, _ = _png(plot_runs([run], tmp_path / "curves.png"))
    assert size == (1500, 800)
    fig = draw([run])
    assert [ax.get_title() for ax in fig.axes] == [t for _, t, _ in PANELS]
    assert [ax.get_xlabel() for ax in fig.axes] == ["", "", "", "tokens", "tokens", "tokens"]
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [256, 512, 768, 1024]
    # A run of an unpublished size (the tiny models) still draws its downstream panels.
    tiny = _run(tmp_path / "tiny", "opt-tiny", {4: {"downstream/arc_easy/acc,none": 0.3}})
    fig = draw([tiny])
    assert [line.get_label() for line in fig.axes[-1].get_lines()] == ["tiny acc"]
