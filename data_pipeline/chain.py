"""The chain: sources -> [reddit] -> ingest -> clean -> dedup -> tokenize, re-runs skip work.

    python -m data_pipeline work_dir=/scratch/run1 \
        'sources=[{name: web, input: /data/cc/}, {name: rd, kind: reddit, input: /dumps/}]'
    python -m data_pipeline --config-dir my_conf --config-name run1     # a YAML of the same

Steps, in order (docs/data-pipeline.md has the whole story):

  reddit    per `kind: reddit` source: Pushshift dumps -> one document per thread (its parts)
  ingest    per source (data_pipeline/stages/ingest.py): read it once (JSONL or a streamed
            Hugging Face source, sources.py) into `ingest/<name>/`, one part per task (tasks
            share its files, or a streamed source's file shards), keeping the documents its
            `include`/`exclude` pass, setting `meta.source = name` and prefixing ids with
            `<name>/`. Later stages read the corpus more than once, so a stream is fetched here.
  steps     the document stages listed in `steps` (default clean, then dedup): clean runs per
            source, dedup once over all sources together; each splits its input files (the
            parts before it) into `tasks` shares, so one source scales out as many do
  tokenize  everything left -> the token shard directory `output` (default work_dir/tokens);
            each source's `weight` becomes tokenize's `weights[name]`: an upsampling factor
            applied to training documents (2 = every document twice, an epoch apart; 0.5 = a
            deterministic half; 0 = the source is left out). `shards: per_source`: one shard set
            per source, `output/<name>`, after the by_source step routes dedup's documents back
            to their sources; the report lists them with a `data.sources` snippet for training

Every step writes `<output>`, `<output>.report.json`, `<output>.rejects.jsonl` (if any) and,
last, `<output>.stage.json`: the stage, every parameter, the input spec and a checksum of every
input and output file. A re-run skips a step when that record matches: same parameters (those
in RUNTIME_PARAMS, which change speed only, excepted), same inputs, outputs present and
unchanged. A changed parameter or input re-runs that step, and its new output changes the next
step's inputs, so everything downstream re-runs too; an upstream step that re-runs into the
same bytes leaves downstream steps skipped. `checksum=stat` compares size and mtime instead of
sha256 for corpora too large to re-hash on every run.

Stage functions are found in one table, STAGES: (module, config class, function), the
function being `run(cfg) -> report` for every stage module. Modules are imported only when a
step needs them; a needed one that is absent fails the run before any work, unless
`missing_stages=skip`, which passes data through a missing clean or dedup (and says so in the
report). The run function is looked up only when its step runs: dedup's package imports its
stage (and the numba kernels) then, so a skipped dedup step costs no numba import, and a
broken dependency of the stage itself (not of its config) surfaces at that step.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from data_pipeline.config_limits import NON_NEGATIVE, OneOf, check_limits
from data_pipeline.files import atomic_write_json, sha256_file
from data_pipeline.runtime.cli import (
    EXIT_FAILED,
    exit_code,
    typed_config,
    write_report,
)
from data_pipeline.runtime.scaleout import ScaleOut, progress
from data_pipeline.runtime.scaleout import validate as validate_scaleout
from data_pipeline.sources import local_files, normalize, plain
from data_pipeline.stages.by_source import refuse_joint_output, shard_sets_summary
from data_pipeline.stages.ingest import DocFilter
from data_pipeline.tokenizer import TokenizerSpec

# stage name -> (module, config class, function `f(cfg) -> report`).
STAGES: dict[str, tuple[str, str, str]] = {
    "reddit": ("data_pipeline.stages.reddit", "RedditConfig", "run"),
    "ingest": ("data_pipeline.stages.ingest", "IngestConfig", "run"),
    "by_source": ("data_pipeline.stages.by_source", "BySourceConfig", "run"),
    "clean": ("data_pipeline.stages.clean", "CleanConfig", "run"),
    "dedup": ("data_pipeline.stages.dedup", "DedupConfig", "run"),
    "decontaminate": ("data_pipeline.stages.decontaminate", "DecontaminateConfig", "run"),
    "tokenize": ("data_pipeline.stages.tokenize", "TokenizeConfig", "run"),
}
# Stages that `missing_stages=skip` may pass data through (reddit output is not its input).
OPTIONAL_STAGES = {"clean", "dedup"}
# Document stages that see all sources at once (the rest run once per source).
ACROSS_SOURCES = {"dedup", "decontaminate"}
# Parameters that change how a stage runs, never what it writes: not compared on re-runs.
RUNTIME_PARAMS = {
    "workers", "batch_bytes", "progress", "progress_interval_s", "tasks", "executor", "slurm",
    "ray", "verbose",
}  # fmt: skip
# Stages split into tasks (data_pipeline.runtime.scaleout); they take the chain's scale-out keys.
SCALED_STAGES = ("reddit", "ingest", "clean", "dedup", "decontaminate", "by_source", "tokenize")
# Parameters naming files a stage reads besides its input (decontamination's evaluation
# texts): checksummed with its inputs, so a changed file re-runs the step.
SIDE_INPUTS = {"decontaminate": ("eval",)}


@dataclass
class CorpusConfig:
    """One corpus the chain prepares (an entry of `sources`). `input`: any spec sources.py accepts
    (for `kind: reddit`, the dump files); `weight`: tokenize's upsampling factor for its
    training documents."""

    name: str = MISSING
    input: Any = MISSING
    kind: str = "documents"
    weight: float = 1.0
    # {meta key: [values]} (stages/ingest.py): keep only / drop documents by their metadata.
    include: Any = None
    exclude: Any = None


@dataclass
class ChainConfig(ScaleOut):
    """`python -m data_pipeline`'s keys; data_pipeline/conf/pipeline.yaml documents each. The
    scale-out keys (tasks, workers, executor, slurm, ray) apply to every stage that is split into
    tasks (reddit, clean, dedup, tokenize) unless that stage's own parameters set them."""

    work_dir: str = MISSING
    output: str | None = None
    sources: list[CorpusConfig] = field(default_factory=list)
    steps: list[str] = field(default_factory=lambda: ["clean", "dedup"])
    missing_stages: str = "error"
    checksum: str = "sha256"
    # joint: one shard set of every source; per_source: one per source under `output`,
    # after the joint dedup (for train-time weights in data.sources).
    shards: str = "joint"
    # Parameters for each stage's config (input and output are set by the chain). `Any` so
    # that a stage's parameters can be given before its module exists on this install.
    reddit: Any = None
    ingest: Any = None
    clean: Any = None
    dedup: Any = None
    decontaminate: Any = None  # docs/data-decontamination.md: eval=, eval_tasks=, action=
    tokenize: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_limits(self, "", CHAIN_LIMITS)


CHECKSUMS = OneOf(("sha256", "stat"))
CHAIN_LIMITS = {  # data_pipeline.config_limits
    "missing_stages": OneOf(("error", "skip")),
    "checksum": CHECKSUMS,
    "shards": OneOf(("joint", "per_source")),
}
CORPUS_LIMITS = {"kind": OneOf(("documents", "reddit")), "weight": NON_NEGATIVE}
# What `steps` may list: the stages that take documents and give documents.
DOCUMENT_STAGES = OneOf(("clean", "dedup", "decontaminate"))


# --- checksums and stage records -------------------------------------------------------------


class Checksums:
    """sha256 (or size+mtime) of files, each computed once per chain run: one step's output
    is the next step's input."""

    def __init__(self, mode: str):
        if not CHECKSUMS.allows(mode):
            raise ValueError(f"checksum must be {CHECKSUMS.describe()}, got {mode!r}")
        self.mode = mode
        self._cache: dict[tuple, str] = {}

    def file(self, path: Path) -> str:
        st = path.stat()
        if self.mode == "stat":
            return f"size={st.st_size},mtime_ns={st.st_mtime_ns}"
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = sha256_file(path)
        return self._cache[key]

    def tree(self, path: Path) -> dict[str, str]:
        """A file, or every file below a directory, by path."""
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            files = [path] if path.is_file() else []
        return {str(p): self.file(p) for p in files}

    def inputs(self, spec: Any) -> dict[str, str]:
        return {str(p): self.file(p) for p in local_files(spec)}


def stage_record_path(output: Path) -> Path:
    return output.with_name(output.name + ".stage.json")


def _comparable(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in RUNTIME_PARAMS}


def _is_complete(record_path: Path, expected: dict, sums: Checksums) -> bool:
    """Whether a step's recorded run matches this one and its outputs are still as written."""
    if not record_path.is_file():
        return False
    try:
        old = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return False
    same = all(old.get(k) == expected[k] for k in ("stage", "params", "input", "inputs"))
    if not same or old.get("checksum") != sums.mode:
        return False
    try:
        return old.get("outputs") and sums.tree(Path(old["output"])) == old["outputs"]
    except OSError:
        return False


def _load_stage(stage: str):
    """(config class, the stage's module) for a stage, importing its module; None when it is not
    installed. The run function is taken from the module only when the step runs: a stage
    package may load its kernels lazily (dedup's numba), which a skipped step never needs."""
    module_name, config_name, _ = STAGES[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise  # the stage exists but something it imports does not: a real failure
        return None
    return getattr(module, config_name), module


def _stage_config(config_cls: type, params: dict, input_spec: Any, output: Path):
    """The stage's typed config: its defaults, the chain's parameters, then input and output;
    a parameter the stage does not have is refused here, naming it."""
    merged = OmegaConf.merge(
        OmegaConf.structured(config_cls),
        params,
        {"input": input_spec, "output": str(output)},
    )
    return OmegaConf.to_object(merged)


class _Runner:
    def __init__(self, cfg: ChainConfig, total_steps: int):
        self.cfg = cfg
        self.sums = Checksums(cfg.checksum)
        self.steps: list[dict] = []
        self.progress = progress(cfg, "chain", total_steps, "step")

    def step(self, stage: str, label: str, input_spec: Any, output: Path, params: dict) -> Path:
        """Run (or skip) one stage; returns where its output is (its input when missing)."""
        try:
            return self._step(stage, label, input_spec, output, params)
        finally:
            self.progress.update(1)

    def _step(self, stage: str, label: str, input_spec: Any, output: Path, params: dict) -> Path:
        t0 = time.perf_counter()
        loaded = _load_stage(stage)
        entry = {"stage": stage, "label": label, "output": str(output)}
        if loaded is None:
            if self.cfg.missing_stages != "skip" or stage not in OPTIONAL_STAGES:
                raise ModuleNotFoundError(
                    f"stage {stage!r} needs module {STAGES[stage][0]}, which is not installed; "
                    "remove it from steps= or set missing_stages=skip to pass data through"
                )
            self.steps.append({**entry, "status": "missing", "output": None})
            return input_spec
        config_cls, module = loaded
        cfg = _stage_config(config_cls, params, input_spec, output)
        inputs = self.sums.inputs(input_spec)
        for key in SIDE_INPUTS.get(stage, ()):
            inputs |= self.sums.inputs(params[key]) if params.get(key) else {}
        expected = {
            "stage": stage,
            "params": _comparable(params),
            "input": input_spec,
            "inputs": inputs,
        }
        record_path = stage_record_path(output)
        if _is_complete(record_path, expected, self.sums):
            report = _read_report(output)
            self.steps.append({**entry, "status": "skipped", "rejects": report.get("rejects")})
            return output
        record_path.unlink(missing_ok=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        report = getattr(module, STAGES[stage][2])(cfg)
        record = {
            **expected,
            "all_params": params,
            "checksum": self.sums.mode,
            "output": str(output),
            "outputs": self.sums.tree(output),
        }
        atomic_write_json(record_path, record, indent=2)
        self.steps.append(
            {
                **entry,
                "status": "ran",
                "seconds": round(time.perf_counter() - t0, 3),
                "rejects": report.get("rejects"),
            }
        )
        return output


def _read_report(output: Path) -> dict:
    p = output.with_name(output.name + ".report.json")
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _validate(cfg: ChainConfig) -> None:
    validate_scaleout(cfg)
    if cfg.executor == "slurm" and not cfg.slurm.wait:
        raise ValueError("slurm.wait=false: the chain needs each stage's output before the next")
    if not cfg.sources:
        raise ValueError("sources is empty: list at least one {name, input}")
    names = [s.name for s in cfg.sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"sources: names must be unique, repeated: {dup}")
    for s in cfg.sources:
        if not s.name or "/" in s.name or s.name.startswith("."):
            raise ValueError(f"sources: name {s.name!r} must be a plain file name")
        check_limits(s, f"sources.{s.name}", CORPUS_LIMITS)
        if s.kind == "documents":
            normalize(s.input)
        DocFilter(s.include, s.exclude, f"sources.{s.name}")
    for step in cfg.steps:
        if not DOCUMENT_STAGES.allows(step):
            raise ValueError(
                f"steps: {step!r} is not a document stage; each must be {DOCUMENT_STAGES.describe()}"
            )
    check_limits(cfg, "", CHAIN_LIMITS)
    # Fail before any work when a needed stage is not installed.
    needed = list(cfg.steps) if cfg.missing_stages == "error" else []
    needed += ["reddit"] if any(s.kind == "reddit" for s in cfg.sources) else []
    absent = [s for s in needed if _load_stage(s) is None]
    if absent:
        mods = ", ".join(STAGES[s][0] for s in absent)
        raise ModuleNotFoundError(
            f"stage(s) {absent} need {mods}, not installed; remove them from steps= or set "
            "missing_stages=skip to pass data through clean/dedup"
        )


@dataclass
class ChainPlan:
    """The chain's config resolved once, at the entry: validated, sources and stage parameters
    as plain Python (the steps take them as they are, never converting them again), each scaled
    stage's parameters with the chain's scale-out keys under them."""

    cfg: ChainConfig
    work: Path
    output: Path
    sources: list[dict]  # {name, input, kind, weight}, in the order given
    params: dict[str, dict]  # stage -> its parameters (scale-out keys filled in)

    @classmethod
    def resolve(cls, cfg: ChainConfig) -> ChainPlan:
        _validate(cfg)
        work = Path(cfg.work_dir)
        params = {s: plain(getattr(cfg, s, None)) or {} for s in STAGES}
        limits = {
            k: getattr(cfg, k) for k in ("max_line_bytes", "max_rejects", "reject_text_bytes")
        }
        keys = ("tasks", "workers", "executor", "progress", "progress_interval_s", "verbose")
        scale = {k: getattr(cfg, k) for k in keys} | limits
        for group in ("slurm", "ray"):
            g = getattr(cfg, group)
            scale[group] = asdict(g) if is_dataclass(g) else plain(g)
        for s in SCALED_STAGES:
            params[s] = {**scale, **params[s]}
        plan = cls(
            cfg=cfg,
            work=work,
            output=Path(cfg.output) if cfg.output else work / "tokens",
            sources=[plain(asdict(s)) for s in cfg.sources],
            params=params,
        )
        plan.check_stage_params()
        return plan

    def check_stage_params(self) -> None:
        """Build every stage's typed config now, so that a misspelt or out-of-range parameter
        (or a missing tokenizer file) fails the run at start-up, not hours later at its step."""
        needed = ["reddit"] * any(s["kind"] == "reddit" for s in self.sources) + ["ingest"]
        needed += [*self.cfg.steps, *["by_source"] * (self.cfg.shards != "joint"), "tokenize"]
        names = [s["name"] for s in self.sources]
        extra = {"ingest": {"source": names[0]}, "by_source": {"sources": names}}
        for stage in needed:
            loaded = _load_stage(stage)
            if loaded is not None:
                params = self.params[stage] | extra.get(stage, {})
                stage_cfg = _stage_config(loaded[0], params, "-", self.work / stage / "check")
        tok = stage_cfg.tokenizer  # tokenize, last: its files are read only when it starts
        TokenizerSpec(name=tok.name, path=tok.path)

    def step_count(self) -> int:
        n = len(self.sources)
        reddit = sum(s["kind"] == "reddit" for s in self.sources)
        steps = sum(1 if s in ACROSS_SOURCES else n for s in self.cfg.steps)
        if self.cfg.shards == "joint":
            return reddit + n + steps + 1
        return reddit + n + steps + self.joint() + n

    def joint(self) -> bool:
        """Whether a step sees every source at once (then per-source shard sets need the
        by_source step to route its documents back)."""
        return any(s in ACROSS_SOURCES for s in self.cfg.steps)


def _flat_inputs(current: list[tuple[str, Any]]) -> list[str]:
    return [str(x) for _, p in current for x in (p if isinstance(p, list) else [p])]


def _ingest_sources(plan: ChainPlan, r: _Runner) -> list[tuple[str, Any]]:
    """Each source (a Reddit one through the reddit stage first) ingested into a directory of
    parts, one per task: (name, output)."""
    current = []
    for src in plan.sources:
        name, spec = src["name"], src["input"]
        if src["kind"] == "reddit":  # its parts stay parts: ingest shares them out
            spec = str(r.step("reddit", name, spec, plan.work / "reddit" / name,
                              plan.params["reddit"]))  # fmt: skip
        params = {**plan.params["ingest"], "source": name}
        params |= {k: src[k] for k in ("include", "exclude") if src[k] is not None}
        current.append((name, r.step("ingest", name, spec, plan.work / "ingest" / name, params)))
    return current


def _document_steps(plan: ChainPlan, r: _Runner, current: list[tuple[str, Any]]) -> list:
    """The `steps` stages in order: per source, or once over all sources (dedup). clean and
    dedup write directories of ordered parts (one per task), so that tokenize after them can
    split its input into as many shares."""
    for stage in plan.cfg.steps:
        if stage in ACROSS_SOURCES:
            out = plan.work / stage / "all"
            current = [
                ("all", r.step(stage, "all", _flat_inputs(current), out, plan.params[stage]))
            ]
        else:
            current = [
                (label, r.step(stage, label, str(p), plan.work / stage / label, plan.params[stage]))
                for label, p in current
            ]
    return current


def _tokenize(plan: ChainPlan, r: _Runner, current: list[tuple[str, Any]]) -> list[dict]:
    """Everything left into the shard directory (`shards: per_source`: one per source, after
    routing a joint step's documents back to their sources), with each source's weight and the
    record of the steps that made its input in the manifest. Returns the shard sets written."""
    chain_record = {
        "chain": {
            "sources": plan.sources,
            "steps": list(plan.cfg.steps),
            "stage_params": {k: _comparable(v) for k, v in plan.params.items()},
        },
        "steps": [
            {k: s[k] for k in ("stage", "label", "output")}
            for s in r.steps
            if s["status"] != "missing"
        ],
        "missing_stages": [s["stage"] for s in r.steps if s["status"] == "missing"],
    }
    params = {
        **plan.params["tokenize"],
        "weights": {s["name"]: s["weight"] for s in plan.sources},
        "pipeline": chain_record,
    }
    if plan.cfg.shards == "joint":
        r.step("tokenize", "tokens", _flat_inputs(current), plan.output, params)
        return [{"name": None, "path": str(plan.output)}]
    names = [s["name"] for s in plan.sources]
    if plan.joint():
        routed = r.step("by_source", "all", _flat_inputs(current), plan.work / "by_source",
                        {**plan.params["by_source"], "sources": names})  # fmt: skip
        current = [(n, routed / n) for n in names]
    sets = []
    for name, docs in current:
        out = plan.output / name
        r.step(
            "tokenize", name, str(docs), out, params | {"weights": {name: params["weights"][name]}}
        )
        sets.append({"name": name, "path": str(out)})
    return sets


def _chain_report(plan: ChainPlan, r: _Runner, t0: float) -> dict:
    rejects = {"total": 0, "not_written": 0, "by_file": {}}
    for s in r.steps:
        rep = s.get("rejects") or {}
        rejects["total"] += rep.get("total", 0)
        rejects["not_written"] += rep.get("not_written", 0)
        for f, counts in rep.get("by_file", {}).items():
            rejects["by_file"][f] = counts
    return {
        "output": str(plan.output),
        "work_dir": str(plan.work),
        "steps": r.steps,
        "ran": [f"{s['stage']}:{s['label']}" for s in r.steps if s["status"] == "ran"],
        "skipped": [f"{s['stage']}:{s['label']}" for s in r.steps if s["status"] == "skipped"],
        "seconds": round(time.perf_counter() - t0, 3),
        "rejects": rejects,
    }


def run(cfg: ChainConfig) -> dict:
    """Run the chain; returns its report (also written to work_dir/chain.report.json)."""
    plan = ChainPlan.resolve(cfg)
    t0 = time.perf_counter()
    plan.work.mkdir(parents=True, exist_ok=True)
    r = _Runner(cfg, plan.step_count())
    if plan.cfg.shards == "per_source":
        refuse_joint_output(plan.output)
    current = _document_steps(plan, r, _ingest_sources(plan, r))
    sets = _tokenize(plan, r, current)
    r.progress.close()
    report = _chain_report(plan, r, t0)
    if plan.cfg.shards == "per_source":
        report |= shard_sets_summary(sets)
        print(
            f"per-source shard sets; for training:\n{report['data_sources_yaml']}", file=sys.stderr
        )
    write_report(plan.work / "chain", report)
    return report


# Hydra's flags that take a value (the next argument unless given as --flag=value).
_HYDRA_VALUE_FLAGS = {"--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp",
                      "--cfg", "-c", "--package", "-p", "--experimental-rerun"}  # fmt: skip


def _hydra_argv(args: list[str], quiet: list[str]) -> list[str]:
    """The user's flags first, then `quiet` and the user's overrides: Hydra's argparse takes
    the overrides as one positional run, so `--config-name opt work_dir=x` after a first batch
    of overrides would be refused as unrecognized arguments."""
    flags, overrides = [], []
    it = iter(args)
    for a in it:
        if a in _HYDRA_VALUE_FLAGS:
            flags += [a, next(it, "")]
        else:
            (flags if a.startswith("-") else overrides).append(a)
    return [*flags, *quiet, *overrides]


def main() -> None:
    """`python -m data_pipeline`: Hydra over ChainConfig with data_pipeline/conf/pipeline.yaml
    as the primary config; exit 0 / 3 (some rejects) / 1 (failed), as for every stage."""
    import hydra
    from hydra.core.config_store import ConfigStore

    from data_pipeline.runtime.cli import HYDRA_QUIET, refusals

    ConfigStore.instance().store(name="chain_schema", node=ChainConfig)
    sys.argv = [sys.argv[0], *_hydra_argv(sys.argv[1:], HYDRA_QUIET)]
    status = {"code": EXIT_FAILED}

    conf = str(Path(__file__).resolve().parent / "conf")  # a path, so conf/ needs no __init__

    @hydra.main(version_base=None, config_path=conf, config_name="pipeline")
    def _main(cfg) -> None:
        with refusals("data_pipeline"):
            report = run(typed_config(cfg))
            print(json.dumps(report, indent=2, sort_keys=True, default=str))
            status["code"] = exit_code(report)

    _main()
    sys.exit(status["code"])
