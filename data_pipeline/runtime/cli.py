"""How every pipeline stage becomes a Hydra command line.

A stage is a typed dataclass config plus a function `run(cfg) -> report` that writes its
outputs and its report (`write_report`, beside the output) itself, so the chain can call it
directly. `stage_main` registers the config with Hydra's ConfigStore (so a misspelt key is
refused by name), runs the stage without Hydra's output directories (the stage writes only
where `output=` says), prints the report, and turns it into the exit status:

    0  finished, no rejected input
    3  finished, some input lines were rejected (counted in the report and in the rejects file)
    1  failed (the message names the file/line/key); outputs are not left half-written
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from data_pipeline.files import atomic_write_json

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REJECTS = 3

# Hydra settings for stages: no run directory, no .hydra output, plain logging.
HYDRA_QUIET = [
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]


def report_path(output: str | Path) -> Path:
    """Where a stage's report goes: beside its output, `<output>.report.json`."""
    out = Path(output)
    return out.with_name(out.name + ".report.json")


def rejects_path(output: str | Path) -> Path:
    out = Path(output)
    return out.with_name(out.name + ".rejects.jsonl")


def write_report(output: str | Path, report: dict) -> Path:
    path = report_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report, indent=2)
    return path


def exit_code(report: dict) -> int:
    return EXIT_REJECTS if report.get("rejects", {}).get("total", 0) else EXIT_OK


def to_container(cfg: Any) -> dict:
    """A plain dict of a stage config (an OmegaConf node or a dataclass), for manifests."""
    from omegaconf import OmegaConf

    if is_dataclass(cfg) and not isinstance(cfg, type):
        return asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def typed_config(cfg: Any) -> Any:
    """The stage's dataclass; a value outside its range (data_pipeline.config_limits) exits
    with the message alone, naming key, range and value, before any work."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_object(cfg)
    except Exception as e:  # OmegaConf wraps __post_init__ errors
        raise SystemExit(f"error: invalid config: {e.__cause__ or e}") from None


@contextlib.contextmanager
def refusals(name: str) -> Iterator[None]:
    """A refusal (a path that is not ours, a run already going) is one line on stderr and exit
    status 1, not a traceback: nothing was touched, and the line says what to do."""
    from data_pipeline.ownership import Refused

    try:
        yield
    except Refused as e:
        print(f"{name}: {e}", file=sys.stderr, flush=True)


def stage_main(name: str, config_cls: type, run: Callable[[Any], dict]) -> None:
    """Run `run` as a Hydra CLI named `name` with `config_cls` as its schema; exits with the
    documented status."""
    import hydra
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"{name}_schema", node=config_cls)
    sys.argv = [sys.argv[0], *HYDRA_QUIET, *sys.argv[1:]]
    status = {"code": EXIT_FAILED}

    @hydra.main(version_base=None, config_path=None, config_name=f"{name}_schema")
    def _main(cfg) -> None:
        typed = typed_config(cfg)
        with refusals(name):
            report = run(typed)
            print(json.dumps(report, indent=2, sort_keys=True, default=str))
            status["code"] = exit_code(report)

    _main()
    sys.exit(status["code"])
