"""Merge token shard sets (e.g. one per Slurm array task) into one shard set.

    python -m data_pipeline.merge 'input=/scratch/run/parts/part-*' output=/data/shards/mix

`input` is a list of shard directories, a glob, or a directory whose subdirectories are shard
sets; globs and directories are taken in sorted name order, so `part-00000` ... `part-00099`
merge in task order. Every part must come from the same tokenizer (name and file hashes), the
same vocabulary, separator and dtype, and the same train/validation rule; anything else stops
the merge naming the first part that differs.

Documents are copied in part order, split by split, through ShardWriter (so the output is an
ordinary shard set: atomic, re-chunked to `max_shard_tokens`, every file hashed). With weights
of 1 (no up/down-sampling), tokenizing N input shards in N tasks and merging gives exactly the
documents, in the same order, of one tokenize run over all inputs; the tests check that. With
other weights each part's repeated passes follow its own first pass, so repeats are a part
apart rather than an epoch apart. The manifest's `pipeline` records the merge and every part's
own pipeline record.
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from data_pipeline.config_limits import AT_LEAST_1, check_limits
from data_pipeline.ownership import check_output
from data_pipeline.runtime.cli import stage_main, write_report
from data_pipeline.shards import MANIFEST, SPLITS, ShardWriter, SplitReader, read_manifest
from data_pipeline.sources import plain

# Manifest fields every part must agree on (`split` is the tokenize stage's split rule).
MUST_MATCH = ("tokenizer", "vocab_size", "eos_id", "dtype", "split")
# Fields ShardWriter writes itself; the rest of a part's manifest is carried over.
OWN_FIELDS = ("format", "version", "tokenizer", "vocab_size", "eos_id", "dtype", "splits",
              "pipeline")  # fmt: skip


@dataclass
class MergeConfig:
    input: Any = MISSING
    output: str = MISSING
    max_shard_tokens: int = 1 << 28

    def __post_init__(self) -> None:
        check_limits(self, "", {"max_shard_tokens": AT_LEAST_1})


def list_parts(spec: Any) -> list[Path]:
    """Shard directories named by `spec` (see the module docstring), in merge order."""
    spec = plain(spec)
    items = spec if isinstance(spec, list) else [spec]
    parts: list[Path] = []
    for item in items:
        p = Path(str(item))
        if (p / MANIFEST).is_file():
            parts.append(p)
        elif p.is_dir():
            # Hidden names are writers' temporaries (ShardWriter's `.<name>.tmp-<pid>`).
            parts.extend(
                sorted(
                    d
                    for d in p.iterdir()
                    if not d.name.startswith(".") and (d / MANIFEST).is_file()
                )
            )
        else:
            found = sorted(Path(f) for f in glob.glob(str(item)) if (Path(f) / MANIFEST).is_file())
            if not found:
                raise FileNotFoundError(f"input={item}: no shard directory (with {MANIFEST})")
            parts.extend(found)
    if not parts:
        raise FileNotFoundError(f"input={spec}: no shard directories")
    return parts


def check_parts(parts: list[Path], manifests: list[dict]) -> None:
    """Every part agrees with the first on MUST_MATCH, or the merge stops naming the first
    that differs."""
    first = manifests[0]
    for path, m in zip(parts[1:], manifests[1:], strict=True):
        for key in MUST_MATCH:
            if m.get(key) != first.get(key):
                raise ValueError(
                    f"{path}: {key} differs from {parts[0]}'s "
                    f"({m.get(key)!r} vs {first.get(key)!r}); parts must come from one config"
                )


def write_merged(
    output: Path,
    order: dict[str, list[tuple[Path, dict]]],
    tokenizer: dict,
    record: dict,
    extra: dict,
    max_shard_tokens: int,
) -> None:
    """One shard set at `output` (atomically) holding, split by split, the documents of the
    (part, manifest) pairs in `order[split]`, in that order."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with ShardWriter(output, tokenizer, record, max_shard_tokens=max_shard_tokens) as writer:
        writer.extra.update(extra)
        for split in SPLITS:
            for path, m in order.get(split, []):
                if split in m["splits"]:
                    for ids in SplitReader(path, split, m).documents():
                        writer.add(ids, split)


def run(cfg: MergeConfig) -> dict:
    t0 = time.perf_counter()
    check_output(cfg.output)  # before reading any part: a typo in output= must cost nothing
    parts = list_parts(cfg.input)
    manifests = [read_manifest(p) for p in parts]
    check_parts(parts, manifests)
    first = manifests[0]
    record = {
        "stage": "merge",
        "parts": [str(p) for p in parts],
        "upstream": [m.get("pipeline", {}) for m in manifests],
    }
    output = Path(cfg.output)
    pairs = list(zip(parts, manifests, strict=True))
    write_merged(
        output,
        {split: pairs for split in SPLITS},
        first["tokenizer"],
        record,
        {k: v for k, v in first.items() if k not in OWN_FIELDS},
        cfg.max_shard_tokens,
    )
    merged = read_manifest(output)
    report = {
        "stage": "merge",
        "output": str(output),
        "parts": len(parts),
        "splits": {
            s: {"documents": v["num_documents"], "tokens": v["num_tokens"]}
            for s, v in merged["splits"].items()
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_report(output, report)
    return report


def main() -> None:
    stage_main("merge", MergeConfig, run)


if __name__ == "__main__":
    main()
