"""Our token shards in the formats other trainers read.

    python -m data_pipeline.convert input=/data/shards/mix output=/data/megatron/mix format=megatron
    python -m data_pipeline.convert input=/data/shards/mix output=/data/nanotron/mix format=datatrove

`output/<split>/` (train, and validation when the shards have one) gets one file set per shard:

- `megatron`: `<shard>.bin` + `<shard>.idx` (Megatron-LM's indexed dataset; pass each
  `output/train/<shard>` prefix to `--data-path`). A document is one sequence ending in the
  separator, as Megatron's `preprocess_data.py --append-eod` writes it.
- `datatrove`: `<shard>.ds` + `.ds.index` + `.ds.metadata` (what DocumentTokenizer writes and
  nanotron's / datatrove's DatatroveFolderDataset read from `output/train`).

Our `.tokens` files are already both formats' token files (flat little-endian ids, a separator
after every document), so they are hard links, not copies (a copy where the filesystem refuses a
link, e.g. across devices): the conversion writes only the small index files. Shards are never
written to (their files are read-only to every tool), so sharing the bytes is safe. uint32
shards become Megatron's int32 (code 4): the same bytes for ids below 2**31.

The output is written in a temporary beside it and renamed into place; an existing output is
replaced only when this project wrote it (its report, `<output>.report.json`, is written before
the rename; data_pipeline/ownership.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import MISSING

from data_pipeline.config_limits import OneOf, check_limits
from data_pipeline.files import fsync_path, publish_dir, temporary_beside
from data_pipeline.formats import datatrove, megatron
from data_pipeline.ownership import check_output, rmtree
from data_pipeline.runtime.cli import stage_main, write_report
from data_pipeline.shards import SPLITS, read_manifest

FORMATS = OneOf(("megatron", "datatrove"))


@dataclass
class ConvertConfig:
    input: str = MISSING  # our shard directory
    output: str = MISSING  # the directory to write (its split subdirectories)
    format: str = MISSING  # megatron | datatrove
    link: bool = True  # hard-link the token files (false: always copy)

    def __post_init__(self) -> None:
        check_limits(self, "", {"format": FORMATS})


def place(src: Path, dst: Path, link: bool) -> str:
    """`dst` as a hard link to `src` where allowed, else a copy; says which."""
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    shutil.copyfile(src, dst)
    return "copied"


def write_shard(src: Path, shard: dict, dtype: np.dtype, out: Path, cfg: ConvertConfig,
                tokenizer: dict) -> str:  # fmt: skip
    """One shard's file set in `out` (the split's directory); returns linked/copied."""
    stem = Path(shard["tokens"]).stem
    index = np.fromfile(src / shard["index"], dtype=np.int64)
    if cfg.format == "megatron":
        how = place(src / shard["tokens"], out / f"{stem}{megatron.DATA}", cfg.link)
        megatron.write_index(out / f"{stem}{megatron.INDEX}", dtype, np.diff(index))
        return how
    how = place(src / shard["tokens"], out / f"{stem}{datatrove.SUFFIX}", cfg.link)
    datatrove.write_index(out / f"{stem}{datatrove.INDEX}", index[1:])
    name = tokenizer.get("path") or tokenizer["name"]
    datatrove.write_metadata(
        out / f"{stem}{datatrove.METADATA}", str(name), dtype.itemsize, int(index[-1])
    )
    return how


def run(cfg: ConvertConfig) -> dict:
    t0 = time.perf_counter()
    src, output = Path(cfg.input), Path(cfg.output)
    check_output(output)  # before reading anything: a typo in output= must cost nothing
    manifest = read_manifest(src)
    dtype = np.dtype(manifest["dtype"])
    tmp = temporary_beside(output)
    rmtree(tmp)
    splits, counts = {}, {"linked": 0, "copied": 0}
    try:
        for split in SPLITS:
            entry = manifest["splits"].get(split)
            if not entry or not entry["shards"]:
                continue
            out = tmp / split
            out.mkdir(parents=True)
            for shard in entry["shards"]:
                counts[write_shard(src, shard, dtype, out, cfg, manifest["tokenizer"])] += 1
            for f in out.iterdir():
                fsync_path(f)
            splits[split] = {
                "documents": entry["num_documents"],
                "tokens": entry["num_tokens"],
                "files": len(entry["shards"]),
            }
        report = {
            "stage": "convert",
            "input": str(src),
            "output": str(output),
            "format": cfg.format,
            "tokenizer": manifest["tokenizer"],
            "eos_id": manifest["eos_id"],
            "splits": splits,
            "token_files": counts,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        check_output(output)  # again: it may have appeared meanwhile
        write_report(output, report)  # the mark that makes the output ours, before it exists
        publish_dir(tmp, output)
    except BaseException:
        rmtree(tmp)
        raise
    return report


def main() -> None:
    stage_main("convert", ConvertConfig, run)


if __name__ == "__main__":
    main()
