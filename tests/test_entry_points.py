"""pyproject.toml's [project.scripts]: every target imports and takes no arguments, and the
scripts behave as the documented `python -m` commands when run through the wrapper pip writes."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def project_scripts() -> dict[str, str]:
    """name -> "module:function", read from pyproject.toml's [project.scripts] table (a regex,
    not tomllib, which CPython 3.10 lacks)."""
    text = (REPO / "pyproject.toml").read_text()
    table = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[)", text, re.S | re.M)
    assert table, "pyproject.toml has no [project.scripts] table"
    return dict(re.findall(r'^([\w-]+) = "([\w.]+:\w+)"$', table.group(1), re.M))


SCRIPTS = project_scripts()

# What pip's console-script wrapper is (pip/_internal/operations/install/wheel.py): the target
# is called with no arguments, reads sys.argv, and its return value becomes the exit status.
WRAPPER = """\
import re
import sys
from {module} import {function}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({function}())
"""


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    module, function = SCRIPTS[name].split(":")
    script = cwd / name
    script.write_text(WRAPPER.format(module=module, function=function))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_documented_clis_all_have_scripts():
    assert set(SCRIPTS) == {
        "opt-train-plan",
        "opt-train-export",
        "opt-train-plot",
        "opt-train-provenance",
        "opt-train-eval",
        "opt-data",
        "opt-data-reddit",
        "opt-data-clean",
        "opt-data-dedup",
        "opt-data-tokenize",
        "opt-data-merge",
        "opt-data-decontaminate",
        "opt-data-convert",
    }


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_target_is_callable_without_arguments(name):
    module, function = SCRIPTS[name].split(":")
    target = getattr(importlib.import_module(module), function)
    assert callable(target)
    inspect.signature(target).bind()  # raises TypeError if an argument is required


@pytest.mark.slow
def test_opt_train_plan_script_reads_argv_and_exits_0(tmp_path):
    out = run_script(
        "opt-train-plan",
        "+model=opt-125m",
        "nodes=1",
        "gpus_per_node=8",
        "format=json",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["world"] == 8 and plan["params_total"] > 100e6  # OPT-125M on one 8-GPU node


def test_opt_data_clean_script_cleans_a_jsonl_as_the_module_does(tmp_path):
    inp = tmp_path / "in.jsonl"
    docs = [{"text": "one  line   \n\n\n\ntwo", "id": "a", "meta": {"k": 1}}]
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = run_script(
        "opt-data-clean", f"input={inp}", f"output={tmp_path / 'out.jsonl'}", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["docs_in"] == 1  # the stage's report on stdout
    [doc] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    # trailing spaces stripped, runs of spaces collapsed, at most one blank line kept
    assert doc == {"text": "one line\n\ntwo", "id": "a", "meta": {"k": 1}}
