"""Where documents come from: local JSONL files or a streamed Hugging Face `datasets` source.

Every stage that reads documents can take the same `input=` value, one of:

    /data/wiki/*.jsonl.zst                    a file, directory or glob of JSONL (see io.py)
    [a.jsonl, /data/books/]                   a list of inputs, read in order
    {jsonl: /data/cc/, name: cc}              JSONL with a source name
    {hf: {path: json, data_files: /data/pile/*.jsonl.zst, split: train}, name: pile}
    {hf: {path: allenai/c4, name: en, split: train, revision: 1588ec4}}

`name`, when given, is written into each document's `meta.source`; the tokenize stage's
`weights` and the chain look documents up by it. The `hf` mapping takes:

    path        a dataset on the hub, a local directory of data files, or a packaged loader
                (`json`, `text`, `parquet`, `csv`) used with `data_files`
    name        the dataset configuration (e.g. `en` for c4); optional
    data_files  files or globs for a packaged loader; optional
    data_dir    optional
    revision    a commit or tag of a hub dataset; pin it so re-runs read the same data
    split       default `train`
    text_field  default `text`
    id_field    default `id`; rows without it get `<label>:<row number>`
    meta_field  default `meta`; a dict there becomes the document's `meta`
    limit       read at most this many rows; optional

Hugging Face sources are always opened with `streaming=True`: rows are fetched as they are read,
so an 800 GB corpus such as the Pile never has to be on local disk (set HF_DATASETS_OFFLINE=1
to make `datasets` fail fast instead of reaching for the network on a local path it cannot
resolve). A row whose text is missing, not a string or empty is a reject (label:row), like a bad
JSONL line; an error from the loader itself (a corrupt remote file) fails the stage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipeline.documents import Rejects, expand_inputs, read_documents

HF_KEYS = {
    "path",
    "name",
    "data_files",
    "data_dir",
    "revision",
    "split",
    "text_field",
    "id_field",
    "meta_field",
    "limit",
}
SOURCE_KEYS = {"jsonl", "hf", "name"}


def plain(spec: Any) -> Any:
    """An input spec as plain Python (OmegaConf nodes and Paths become dicts, lists, strings)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(spec, (DictConfig, ListConfig)):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(spec, Path):
        return str(spec)
    if isinstance(spec, (list, tuple)):
        return [plain(s) for s in spec]
    if isinstance(spec, dict):
        return {k: plain(v) for k, v in spec.items()}
    return spec


def normalize(spec: Any) -> list[dict]:
    """The spec as a list of `{"jsonl": ...}` / `{"hf": {...}}` entries (with `name` if given),
    validated, so a misspelt key fails before any data is read."""
    spec = plain(spec)
    if spec is None or spec == "" or spec == []:
        raise ValueError("input is empty: give a JSONL path/glob/dir or {hf: {...}}")
    if isinstance(spec, list):
        if all(isinstance(s, str) for s in spec):
            return [{"jsonl": spec}]
        return [e for s in spec for e in normalize(s)]
    if isinstance(spec, str):
        return [{"jsonl": spec}]
    if not isinstance(spec, dict):
        raise ValueError(f"input: expected a path, a list or a mapping, got {spec!r}")
    unknown = set(spec) - SOURCE_KEYS
    if unknown:
        raise ValueError(f"input: unknown key(s) {sorted(unknown)}; valid: {sorted(SOURCE_KEYS)}")
    if ("jsonl" in spec) == ("hf" in spec):
        raise ValueError(f"input: give exactly one of 'jsonl' or 'hf', got {spec!r}")
    if "hf" in spec:
        hf = spec["hf"]
        if not isinstance(hf, dict) or not hf.get("path"):
            raise ValueError(f"input.hf: needs at least 'path' (a dataset name or dir), got {hf!r}")
        unknown = set(hf) - HF_KEYS
        if unknown:
            raise ValueError(
                f"input.hf: unknown key(s) {sorted(unknown)}; valid: {sorted(HF_KEYS)}"
            )
    return [spec]


def hf_label(hf: dict) -> str:
    """How an HF source is named in rejects and default ids: `hf:path[/config]:split`."""
    cfg = f"/{hf['name']}" if hf.get("name") else ""
    return f"hf:{hf['path']}{cfg}:{hf.get('split', 'train')}"


def _load_hf(hf: dict):
    import datasets

    kwargs = {k: hf[k] for k in ("name", "data_files", "data_dir", "revision") if hf.get(k)}
    return datasets.load_dataset(
        hf["path"], split=hf.get("split", "train"), streaming=True, **kwargs
    )


def hf_shards(hf: dict) -> int:
    """How many file shards a streamed HF source has (its data files, in order), so that tasks
    can read it in shares; 1 with `limit` (a limit counts rows across the whole dataset)."""
    return 1 if hf.get("limit") is not None else max(1, _load_hf(hf).num_shards)


def iter_hf_documents(
    hf: dict, rejects: Rejects, shard: int | None = None, shards: int = 1
) -> Iterator[dict]:
    """Documents from a streamed `datasets` source; bad rows go to `rejects` as label:row.
    With `shard`, only that one of its `shards` file shards (datasets' contiguous shard): rows
    without an id are then named `<label>#<shard>:<row in the shard>`, so ids do not depend on
    how shards are shared out (one shard: `<label>:<row>`, as for the whole dataset)."""
    label = hf_label(hf)
    ds = _load_hf(hf)
    if shard is not None and shards > 1:
        if ds.num_shards != shards:  # the files changed between planning and reading
            raise RuntimeError(f"{label}: {ds.num_shards} file shards now, {shards} planned")
        ds = ds.shard(shards, shard, contiguous=True)
        label = f"{label}#{shard}"
    text_field = hf.get("text_field", "text")
    id_field = hf.get("id_field", "id")
    meta_field = hf.get("meta_field", "meta")
    limit = hf.get("limit")
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        text = row.get(text_field)
        if not isinstance(text, str) or not text.strip():
            if text is None:
                reason = f"missing field {text_field!r}"
            else:
                reason = "text is not a string" if not isinstance(text, str) else "empty text"
            rejects.add(label, i + 1, reason, json.dumps(row, default=str)[:10000])
            continue
        meta = row.get(meta_field)
        doc_id = row.get(id_field)
        yield {
            "text": text,
            "id": str(doc_id) if doc_id is not None else f"{label}:{i + 1}",
            "meta": dict(meta) if isinstance(meta, dict) else {},
        }


def iter_source_documents(spec: Any, rejects: Rejects, progress=None) -> Iterator[dict]:
    """Documents `{"text", "id", "meta"}` from any input spec (see the module docstring), in a
    deterministic order: entries in the order given, JSONL files sorted within an entry.
    `progress` is told the bytes of the JSONL files read (a streamed HF source tells it
    nothing: its size is not known up front)."""
    for entry in normalize(spec):
        if "hf" in entry:
            docs = iter_hf_documents(entry["hf"], rejects)
        else:
            docs = read_documents(entry["jsonl"], rejects, progress)
        name = entry.get("name")
        for doc in docs:
            if name is not None:
                doc["meta"] = {**doc["meta"], "source": name}
            yield doc


def pieces(spec: Any) -> list[dict]:
    """The spec as the units tasks share out, in read order: one per local JSONL file
    (`{"jsonl": path, "size": bytes}`) and one per file shard of a streamed HF source
    (`{"hf": {...}, "shard": k, "shards": n, "size": bytes or None}`; the size is the shard's
    local data file's when the files and shards pair up, else unknown), each with the entry's
    `name` when it has one. Reading the pieces in order gives iter_source_documents' documents.
    A hub source is asked for its shard count here (a network round trip, once per run)."""
    out: list[dict] = []
    for entry in normalize(spec):
        named = {"name": entry["name"]} if "name" in entry else {}
        if "jsonl" in entry:
            out += [{"jsonl": str(f), "size": f.stat().st_size, **named}
                    for f in expand_inputs(entry["jsonl"])]  # fmt: skip
            continue
        hf = entry["hf"]
        n = hf_shards(hf)
        files = local_files({"hf": hf})
        sizes = [f.stat().st_size for f in files] if len(files) == n else [None] * n
        out += [{"hf": hf, "shard": k, "shards": n, "size": sizes[k], **named} for k in range(n)]
    return out


def iter_piece_documents(piece: dict, rejects: Rejects, progress=None) -> Iterator[dict]:
    """The documents of one of `pieces`' units (`progress` told a JSONL file's bytes)."""
    if "hf" in piece:
        docs = iter_hf_documents(piece["hf"], rejects, piece["shard"], piece["shards"])
    else:
        docs = read_documents(piece["jsonl"], rejects, progress)
    name = piece.get("name")
    for doc in docs:
        if name is not None:
            doc["meta"] = {**doc["meta"], "source": name}
        yield doc


def local_files(spec: Any) -> list[Path]:
    """The local files a spec reads (JSONL inputs; an HF source's local data_files or dir), so a
    caller can checksum them. Hub datasets have none: their identity is the spec and revision."""
    files: list[Path] = []
    for entry in normalize(spec):
        if "jsonl" in entry:
            files += expand_inputs(entry["jsonl"])
            continue
        hf = entry["hf"]
        data_files = hf.get("data_files")
        if isinstance(data_files, dict):
            data_files = [
                f for v in data_files.values() for f in ([v] if isinstance(v, str) else v)
            ]
        if data_files:
            files += _expand_any(data_files)
        elif Path(str(hf["path"])).is_dir():
            d = Path(str(hf["path"])) / (hf.get("data_dir") or "")
            files += sorted(f for f in d.rglob("*") if f.is_file() and ".cache" not in f.parts)
    return files


def _expand_any(spec: str | list) -> list[Path]:
    import glob

    out: list[Path] = []
    for s in [spec] if isinstance(spec, str) else spec:
        p = Path(s)
        out += [p] if p.is_file() else sorted(Path(f) for f in glob.glob(str(s), recursive=True))
    return out
