"""`python -m opt_train.provenance RUN_DIR step=N [rank=R] [world=W] [full=true]
[format=text|json]`: the documents behind a step, with their text.

The run's order is rebuilt from what the run_dir holds: `config.yaml` (data, seed, batch) and
the skip list in force, `data.skip_steps` plus the rollbacks' decisions in the newest
checkpoint's `state.json` (opt_train/train/callbacks/stability.py), so step N is the batch the
run's step N trained on in the end (a step that a rollback undid read another batch: its spike
row names those documents). The data-parallel world is the newest checkpoint's (1 without
one); `world=` asks for another, which splits the same documents differently over the ranks.
Text is decoded with the tokenizer the shard manifest names (data_pipeline.tokenizer).
Reads only: nothing in the run_dir is created or changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from data_pipeline.tokenizer import Tokenizer, TokenizerSpec
from opt_train.checkpoint.layout import STEP_DIR
from opt_train.config import JobConfig
from opt_train.data.loader import GlobalOrderLoader, open_sources
from opt_train.data.provenance import DocumentSpan, step_documents

USAGE = (
    "usage: python -m opt_train.provenance RUN_DIR step=N [rank=R] [world=W] [full=true] "
    "[format=text|json]"
)
KEYS = {"step": int, "rank": int, "world": int, "full": bool, "format": str}


def parse_args(argv: list[str]) -> tuple[Path, dict]:
    """RUN_DIR and the key=value arguments, each checked (an unknown key names the known)."""
    if not argv or "=" in argv[0] or argv[0] in ("-h", "--help"):
        raise SystemExit(USAGE)
    args: dict = {"full": False, "format": "text"}
    for a in argv[1:]:
        key, eq, value = a.partition("=")
        if not eq or key not in KEYS:
            raise SystemExit(f"error: {a!r}: expected one of {', '.join(f'{k}=' for k in KEYS)}")
        kind = KEYS[key]
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"error: {key}={value}: expected true or false")
            args[key] = value.lower() == "true"
        elif kind is int:
            try:
                args[key] = int(value)
            except ValueError:
                raise SystemExit(f"error: {key}={value}: expected an integer") from None
        else:
            args[key] = value
    if "step" not in args:
        raise SystemExit(f"error: step=N is required\n{USAGE}")
    if args["format"] not in ("text", "json"):
        raise SystemExit(f"error: format={args['format']}: expected text or json")
    return Path(argv[0]), args


def run_config(run_dir: Path) -> JobConfig:
    """The run's `config.yaml` over the schema's defaults, as the run itself read it."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (is {run_dir} a run directory?)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except Exception as e:  # OmegaConf wraps the schema's errors; show the message alone
        raise SystemExit(f"error: {path}: {e.__cause__ or e}") from None


def newest_state(run_dir: Path) -> dict:
    """The trainer state (`state.json`, plain JSON) of the newest checkpoint that has one;
    {} without a checkpoint. Only the skip list and the mesh are read from it."""
    steps = sorted(
        (
            int(m.group(1))
            for p in (run_dir / "checkpoints").glob("step_*")
            if (m := STEP_DIR.match(p.name))
        ),
        reverse=True,
    )
    for step in steps:
        path = run_dir / "checkpoints" / f"step_{step:08d}" / "state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return {}


def run_loader(run_dir: Path, world: int | None = None) -> GlobalOrderLoader:
    """The run's loader (rank 0 of `world` data-parallel ranks), with the run's skip list."""
    cfg = run_config(run_dir)
    state = newest_state(run_dir)
    mesh = state.get("mesh") or {}
    if world is None:
        world = int(mesh.get("dp_replicate", 1)) * int(mesh.get("dp_shard", 1))
        if cfg.engine == "deepspeed":
            world = int(state.get("world", 1))
    stability = state.get("callbacks", {}).get("stability", {})
    skips = [tuple(r) for r in (*cfg.data.skip_steps, *stability.get("skip_steps", []))]
    cfg.data.verify = False  # a read of every shard is not needed to name documents
    return GlobalOrderLoader(
        open_sources(cfg.data), cfg.train.seed, cfg.global_batch_samples(), 1, 0, world, skips
    )


def document_text(tokenizer: Tokenizer, span: DocumentSpan, loader, full: bool) -> str:
    """The window's part of the document (`full`: the whole document), decoded."""
    windows = next(s.windows for s in loader.sources if str(s.windows.reader.path) == span.path)
    r = windows.reader
    first = int(r.starts[span.shard] + r.indexes[span.shard][span.doc])
    a, b = (0, span.doc_tokens) if full else (span.start, min(span.end, span.doc_tokens))
    return tokenizer.decode(r.read(first + a, b - a)) if b > a else ""


def spike_rows(run_dir: Path, step: int) -> list[dict]:
    """metrics.jsonl's spike rows at `step` that name their documents (a torn or hand-written
    line is passed over)."""
    path = run_dir / "metrics.jsonl"
    found = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(row, dict)
                and row.get("event") == "spike"
                and row.get("step") == step
                and isinstance(row.get("documents"), list)
            ):
                found.append(row)
    return found


def named_document_text(loader, entry: list, full: bool, chars: int = 600) -> tuple[str, str]:
    """(where, text) of a spike row's [source, shard, doc(, id)] entry; the text cut at
    `chars` characters unless `full`."""
    source, shard, doc = entry[:3]
    src = next((s for s in loader.sources if s.name == source), None)
    if src is None:
        return f"{source} shard {shard} document {doc}", "(not a source of this run's config)"
    r = src.windows.reader
    first, after = (int(x) for x in r.indexes[shard][doc : doc + 2])
    text = manifest_tokenizer(loader).decode(
        r.read(int(r.starts[shard]) + first, after - first - 1)
    )
    if not full and len(text) > chars:
        text = text[:chars] + f" ... ({len(text)} characters; full=true prints all)"
    name = source if source is not None else str(r.path)
    shard_file = r.manifest["splits"][src.windows.split]["shards"][shard]["tokens"]
    ident = f" id {entry[3]}" if len(entry) > 3 else ""
    return f"{name} shard {shard} ({shard_file}) document {doc}{ident}", text


def print_spikes(run_dir: Path, step: int, loader, full: bool) -> None:
    """The documents that spike rows at `step` name: the batch the step read when it spiked,
    which the rollback then skipped (so the run's step `step` read another in the end)."""
    for row in spike_rows(run_dir, step):
        print(
            f"spike at step {step} ({row.get('reason')} {row.get('value')}, action "
            f"{row.get('action')}): the {len(row['documents'])} documents of the batch it read"
        )
        for entry in row["documents"]:
            where, text = named_document_text(loader, entry, full)
            print(f"  {where}")
            print("    " + text.replace("\n", "\n    "))


def describe(span: DocumentSpan) -> str:
    source = span.source if span.source is not None else span.path
    sep = " + </s>" if span.end > span.doc_tokens else ""
    return (
        f"  {source} shard {span.shard} ({span.shard_file}) document {span.doc}"
        f"{f' id {span.id}' if span.id is not None else ''}: tokens {span.start}-"
        f"{min(span.end, span.doc_tokens)} of {span.doc_tokens}{sep}, at window offset "
        f"{span.offset}"
    )


def as_json(run_dir: Path, step: int, spans: list[DocumentSpan], loader, full: bool) -> dict:
    tokenizer = manifest_tokenizer(loader)
    spikes = []
    for row in spike_rows(run_dir, step):
        named = [named_document_text(loader, e, full) for e in row["documents"]]
        spikes.append(
            {
                "spike": {k: v for k, v in row.items() if k != "documents"},
                "documents": [{"where": w, "text": t} for w, t in named],
            }
        )
    documents = [{**s.as_dict(), "text": document_text(tokenizer, s, loader, full)} for s in spans]
    return {"step": step, "documents": documents, "spikes": spikes}


def manifest_tokenizer(loader) -> Tokenizer:
    """The tokenizer the (first) source's manifest names: every source shares it (the loader
    refuses a mixture of tokenizers)."""
    record = loader.sources[0].windows.reader.manifest["tokenizer"]
    return Tokenizer(TokenizerSpec(record["name"], record.get("path")))


def main(argv: list[str] | None = None) -> None:
    run_dir, args = parse_args(sys.argv[1:] if argv is None else argv)
    loader = run_loader(run_dir, args.get("world"))
    step, full = args["step"], args["full"]
    try:
        spans = step_documents(loader, step, loader.world, args.get("rank"))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args["format"] == "json":
        print(json.dumps(as_json(run_dir, step, spans, loader, full), indent=1))
        return
    tokenizer = manifest_tokenizer(loader)
    print(
        f"step {step} of {run_dir}: {loader.global_batch} windows of {loader.seq_len + 1} "
        f"tokens over {loader.world} data-parallel rank(s)"
    )
    sample = None
    for s in spans:
        if s.sample != sample:
            sample = s.sample
            print(f"rank {s.rank} | sample {s.sample} | window {s.window}")
        print(describe(s))
        print("    " + document_text(tokenizer, s, loader, full).replace("\n", "\n    "))
    print_spikes(run_dir, step, loader, full)


__all__ = ["main"]
