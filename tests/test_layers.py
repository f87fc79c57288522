"""The layering rule (pyproject.toml's [tool.importlinter] contracts, docs/architecture.md) holds:
import-linter, run as CI runs it, reports every contract kept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# `lint-imports` is this function's console script; calling it through sys.executable runs the
# real tool in the interpreter (and environment) the tests run in.
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint_imports(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), str(REPO)]))
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_import_contract_is_kept():
    n = (REPO / "pyproject.toml").read_text().count("\n[[tool.importlinter.contracts]]\n")
    out = lint_imports(REPO)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    # Every contract in pyproject ran (none skipped by a config slip) and none broke.
    assert f"Contracts: {n} kept, 0 broken." in report, report


def test_deferred_imports_break_a_layer_and_type_checking_imports_do_not(tmp_path):
    """The settings the contracts rely on: an import inside a function counts (a cycle cannot
    hide there), one under `if TYPE_CHECKING:` does not (a callback may name the Trainer)."""
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "high.py").write_text("from probe import low\n")
    (pkg / "low.py").write_text(
        textwrap.dedent(
            """\
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from probe.high import something  # a type hint only: allowed


            def later():
                from probe import high  # deferred, still an upward import

                return high
            """
        )
    )
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [tool.importlinter]
            root_packages = ["probe"]
            exclude_type_checking_imports = true

            [[tool.importlinter.contracts]]
            name = "probe layers"
            type = "layers"
            containers = ["probe"]
            layers = ["high", "low"]
            """
        )
    )
    out = lint_imports(tmp_path)
    report = out.stdout + out.stderr
    assert out.returncode == 1, report
    assert "probe.low -> probe.high (l.8)" in report, report
    assert "(l.4)" not in report, report
