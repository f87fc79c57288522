"""Writing Hugging Face directories: `save_hf` from a model in memory, `export_checkpoint`
and `python -m opt_train.hf` from a training checkpoint.

Our parameter names are HF's without the `model.decoder.` prefix, and HF ties `lm_head` to
`embed_tokens`, so conversion is a rename. Weights are written as safetensors and read with
safetensors or `torch.load(weights_only=True)` by transformers; nothing executes code from a file.

An exported directory is what transformers needs as it is: `config.json` and
`generation_config.json` whose special-token ids are the training data's separator, the
tokenizer that made the data (`tokenizer.json`, from the shard manifest: GPT-2's files for
`gpt2`, the user's OPT files for `opt`, checked against the hashes the manifest recorded), and
the weights in `export.dtype`, split into files of at most `export.max_shard_size` with
`model.safetensors.index.json` above it, and `opt_train_export.json`, the export record (run,
checkpoint, step) without which no existing directory is replaced. `export_checkpoint` reads
the weights from the DCP checkpoint one file's worth at a time, so exporting never holds the
whole model in memory, through `opt_train.checkpoint.trusted.load_dcp` (no code from the checkpoint
runs), and changes nothing in the run_dir it reads.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from data_pipeline.files import publish_dir, temporary_beside
from data_pipeline.ownership import NotOursError, check_output, rmtree
from opt_train.config import ExportConfig, ModelConfig, parse_size
from opt_train.model.dtypes import DTYPES
from opt_train.model.hf import (
    HF_PREFIX,
    SpecialTokens,
    hf_config_from_model_config,
    hf_tokenizer,
)
from opt_train.model.opt import OPT, param_shapes

log = logging.getLogger(__name__)


def write_tokenizer(out: Path, record: dict, model_vocab: int, max_positions: int) -> SpecialTokens:
    """The HF tokenizer of a shard manifest's `tokenizer` record (`hf_tokenizer`) into `out`;
    returns its ids."""
    tok, ids = hf_tokenizer(record, model_vocab, max_positions)
    tok.save_pretrained(out)
    return ids


def _shard_plan(
    names_shapes: list[tuple[str, torch.Size]], itemsize: int, limit: int
) -> list[list[tuple[str, torch.Size]]]:
    """Consecutive groups of tensors of at most `limit` bytes (one tensor may exceed it)."""
    groups: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, shape in names_shapes:
        n = shape.numel() * itemsize
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    return groups


# The export record: written into every directory an export makes, and what lets a later
# export replace that directory. A `config.json` alone proves nothing: every HF model has one.
EXPORT_RECORD = "opt_train_export.json"
EXPORT_KIND = "opt-train-hf-export/1"


def _export_record(source: dict | None) -> dict:
    return {"kind": EXPORT_KIND, **(source or {})}


def is_our_export(path: Path) -> bool:
    """Whether `path` is a real directory (not a link) holding an export record we wrote."""
    record = path / EXPORT_RECORD
    if path.is_symlink() or not path.is_dir() or not record.is_file() or record.is_symlink():
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("kind") == EXPORT_KIND
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _ours_to_replace(path: Path) -> bool:
    """An earlier export, or an empty real directory (nothing in it to lose)."""
    return is_our_export(path) or (
        path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    )


def check_export_target(out: Path) -> None:
    """Refuse (NotOursError, one line, nothing touched) an output that exists and is not an
    empty directory or an earlier export of ours (data_pipeline.ownership holds the rule)."""
    check_output(out, "output", _ours_to_replace, "opt-train export")


def write_hf_dir(
    out_dir: str | Path,
    model_config: ModelConfig,
    names_shapes: list[tuple[str, torch.Size]],
    fetch: Callable[[list[tuple[str, torch.Size]]], Iterable[tuple[str, torch.Tensor]]],
    tokenizer: dict | None = None,
    export: ExportConfig | None = None,
    source: dict | None = None,
) -> Path:
    """Write an HF OPT directory. `fetch(group)` yields (our name, tensor) for one group of the
    shard plan, so only one weight file's tensors are in memory at a time. The directory is
    built beside `out_dir` and renamed into place when complete: a killed export leaves no
    half-written model where transformers would look. An existing `out_dir` is replaced only
    when it is an earlier export (its `EXPORT_RECORD`, which `source` (run, checkpoint, step)
    goes into) or empty; anything else is refused before any work."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    export = export or ExportConfig()
    dtype = DTYPES[export.dtype]
    out = Path(out_dir)
    check_export_target(out)
    tmp = temporary_beside(out)
    rmtree(tmp)
    tmp.mkdir(parents=True)
    tokens = SpecialTokens()
    if tokenizer is not None and tokenizer.get("name") in ("gpt2", "opt"):
        tokens = write_tokenizer(
            tmp, tokenizer, model_config.vocab_size, model_config.max_positions
        )
    elif tokenizer is not None:
        eos = int(tokenizer["eos_id"])
        tokens = SpecialTokens(bos=eos, eos=eos, pad=eos)
        log.warning("tokenizer %r has no HF files; exporting without one", tokenizer.get("name"))
    hf_config = hf_config_from_model_config(model_config, tokens, export.dtype)
    hf_config.save_pretrained(tmp)
    GenerationConfig.from_model_config(hf_config).save_pretrained(tmp)

    itemsize = torch.empty((), dtype=dtype).element_size()
    groups = _shard_plan(names_shapes, itemsize, parse_size(export.max_shard_size))
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups):
        fname = (
            "model.safetensors"
            if len(groups) == 1
            else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        tensors = {
            HF_PREFIX + name: t.detach().to("cpu", dtype).contiguous() for name, t in fetch(group)
        }
        save_file(tensors, tmp / fname, metadata={"format": "pt"})
        total += sum(t.numel() * itemsize for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / EXPORT_RECORD).write_text(json.dumps(_export_record(source), indent=1) + "\n")
    if out.exists() or out.is_symlink():
        check_export_target(out)  # again: it may have changed during the export
    publish_dir(tmp, out, sync_files=True)
    return out


def save_hf(
    model: OPT,
    model_config: ModelConfig,
    out_dir: str | Path,
    tokenizer: dict | None = None,
    export: ExportConfig | None = None,
) -> Path:
    """Write an HF directory that `transformers.OPTForCausalLM.from_pretrained` loads, from a
    model in memory. `tokenizer`: a shard manifest's `tokenizer` record (its files and ids
    are written); without it the ids are OPT's and no tokenizer is written."""
    state = model.state_dict()
    names_shapes = [(k, v.shape) for k, v in state.items()]
    return write_hf_dir(
        out_dir,
        model_config,
        names_shapes,
        lambda group: ((name, state[name]) for name, _ in group),
        tokenizer,
        export,
    )


FETCH_BYTES = 1 << 30  # fp32 bytes read from the checkpoint per DCP load while exporting


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    data_path: str | None = None,
) -> dict:
    """Export a training checkpoint (a run_dir, its checkpoints/ or one checkpoint) to an HF
    directory. `overrides`: `export.KEY=VALUE` over the run's own `export` section.
    `data_path`: the token data whose tokenizer record names the tokenizer (default: the run's
    `data.path`, or the embedded corpus)."""
    from omegaconf import OmegaConf

    from data_pipeline.formats import open_split
    from opt_train.checkpoint.layout import FORMAT, find_checkpoint
    from opt_train.checkpoint.trusted import load_dcp
    from opt_train.config import JobConfig
    from opt_train.data.loader import read_options, resolve_data_path

    ckpt = find_checkpoint(checkpoint)  # verified: sizes and checksums of every file
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta["format"] != FORMAT:
        raise ValueError(f"{ckpt}: {meta['format']} checkpoints are not exported; only {FORMAT}")
    raw = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(ckpt / "config.yaml"))
    for ov in overrides or []:
        key, _, value = ov.partition("=")
        if not key.startswith("export.") or not value:
            raise SystemExit(f"error: {ov!r}: only export.KEY=VALUE overrides are accepted")
        try:
            OmegaConf.update(raw, key, value, merge=False)
        except Exception as e:
            raise SystemExit(f"error: {ov!r}: {e}") from None
    try:
        cfg: JobConfig = OmegaConf.to_object(raw)
    except Exception as e:
        raise SystemExit(f"error: invalid export config: {e.__cause__ or e}") from None
    data = Path(data_path) if data_path else resolve_data_path(cfg.data.path, cfg.data.cache_dir)
    # Any format data.path accepts: foreign data's record is the one its config declared.
    tokenizer = open_split(data, "train", read_options(cfg.data)).manifest["tokenizer"]

    names_shapes = [(n, torch.Size(s)) for n, s in param_shapes(cfg.model).items()]

    def fetch(group):
        # Chunks of at most FETCH_BYTES of fp32, each cast to the export dtype by the writer
        # before the next is read: memory holds one weight file plus one chunk.
        chunk: dict[str, torch.Tensor] = {}
        for i, (name, shape) in enumerate(group):
            chunk[name] = torch.empty(shape, dtype=torch.float32)
            size = sum(t.numel() * 4 for t in chunk.values())
            if size >= FETCH_BYTES or i == len(group) - 1:
                load_dcp({"model": chunk}, ckpt)  # runs no code from the checkpoint
                yield from chunk.items()
                chunk = {}

    check_export_target(Path(out_dir))  # before reading anything
    source = {"run_dir": str(ckpt.resolve().parent.parent), "checkpoint": ckpt.name}
    source["step"] = meta["step"]
    out = write_hf_dir(out_dir, cfg.model, names_shapes, fetch, tokenizer, cfg.export, source)
    return {
        "exported": str(out),
        "checkpoint": str(ckpt),
        "step": meta["step"],
        "model": cfg.model.name,
        "dtype": cfg.export.dtype,
        "tokenizer": tokenizer.get("name"),
        "files": sorted(p.name for p in out.iterdir()),
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m opt_train.hf CHECKPOINT OUT_DIR [export.dtype=bf16] [export.max_shard_size=2GB]`:
    export a training checkpoint to an HF directory."""
    p = argparse.ArgumentParser(prog="python -m opt_train.hf", description=main.__doc__)
    p.add_argument("checkpoint", help="a run_dir, its checkpoints/ dir, or one checkpoint dir")
    p.add_argument("out_dir", help="where to write the HF model directory")
    p.add_argument(
        "overrides", nargs="*", help="export.dtype=fp32|bf16|fp16, export.max_shard_size=5GB"
    )
    p.add_argument("--data", help="shard directory whose manifest names the tokenizer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from opt_train.checkpoint.trusted import CorruptCheckpoint

    try:
        done = export_checkpoint(args.checkpoint, args.out_dir, args.overrides, args.data)
    except (NotOursError, FileNotFoundError, CorruptCheckpoint) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(done))


if __name__ == "__main__":
    main()
