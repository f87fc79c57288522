"""`model.init_from=<HF directory>`: start a fresh run from an HF OPT model's weights.

The directory is what `save_pretrained` writes, or a facebook/opt-* snapshot: `config.json`
and safetensors weights (`model.safetensors`, or `model.safetensors.index.json` with its
files). Pickled weights (`pytorch_model.bin`) are refused: loading them could run code.

Its shape must be the configured one (`+model=opt-125m` for facebook/opt-125m); every
difference is named before anything is read. Each rank then reads, through safetensors' memory
map, only the slice of each tensor that its FSDP/TP shard holds, so no rank ever holds a full
copy of a large model (a one-process model is its own single shard).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from opt_train.config import ModelConfig

SHAPE_KEYS = (
    "vocab_size",
    "n_layers",
    "n_heads",
    "d_model",
    "ffn",
    "max_positions",
    "embed_dim",
    "pre_layer_norm",
)
# The config keys behind the derived sizes compared.
_KEY_NAMES = {"ffn": "ffn_dim", "embed_dim": "word_embed_proj_dim"}
# Wrappers that activation checkpointing and torch.compile put into parameter names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


class InitFromError(ValueError):
    """`model.init_from` names a directory that cannot initialise this model."""


def check_shapes(model_cfg: ModelConfig, hf_dir: Path) -> None:
    """Compare the HF directory's config.json with the configured model shape."""
    from transformers import OPTConfig

    from opt_train.model.hf import model_config_from_hf

    if not (hf_dir / "config.json").is_file():
        raise InitFromError(f"model.init_from={hf_dir}: no config.json (not an HF model directory)")
    try:
        theirs = model_config_from_hf(OPTConfig.from_pretrained(hf_dir))
    except ValueError as e:
        raise InitFromError(f"model.init_from={hf_dir}: {e}") from None
    diffs = [
        f"  model.{_KEY_NAMES.get(k, k)}: configured {getattr(model_cfg, k)}, "
        f"{hf_dir} has {getattr(theirs, k)}"
        for k in SHAPE_KEYS
        if getattr(model_cfg, k) != getattr(theirs, k)
    ]
    if diffs:
        raise InitFromError(
            f"model.init_from={hf_dir} does not have the configured shape:\n"
            + "\n".join(diffs)
            + "\nSelect the matching +model=... or set these keys."
        )


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: hf_dir / f for name, f in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    pickled = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(
        p.name for p in hf_dir.glob("*.pt")
    )
    found = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
    raise InitFromError(
        f"model.init_from={hf_dir}: no model.safetensors or model.safetensors.index.json{found}. "
        "Convert it once with transformers: OPTForCausalLM.from_pretrained(dir)"
        ".save_pretrained(out) writes safetensors."
    )


def _our_name(param_name: str) -> str:
    for part in _WRAPPER_PARTS:
        param_name = param_name.replace(part, "")
    return param_name


def _local_slices(p: torch.Tensor) -> tuple[slice, ...]:
    """The index of this rank's shard of `p` in the full tensor (all of it when not a DTensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return tuple(slice(0, n) for n in p.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


@torch.no_grad()
def load_init_weights(model: nn.Module, model_cfg: ModelConfig) -> None:
    """Overwrite `model`'s parameters (plain, or FSDP2/TP-sharded DTensors already on their
    device) with those of `model_cfg.init_from`."""
    from safetensors import safe_open

    from opt_train.model.hf import our_name

    hf_dir = Path(model_cfg.init_from).expanduser()
    check_shapes(model_cfg, hf_dir)
    files = weight_files(hf_dir)
    by_ours = {n: hf for hf in files if (n := our_name(hf)) is not None}
    params = {_our_name(n): p for n, p in model.named_parameters()}
    missing = sorted(set(params) - set(by_ours))
    extra = sorted(set(by_ours) - set(params))
    if missing or extra:
        raise InitFromError(
            f"model.init_from={hf_dir}: tensors missing {missing[:5]}, unexpected {extra[:5]}"
        )
    handles: dict[Path, object] = {}
    try:
        for name, p in params.items():
            path = files[by_ours[name]]
            if path not in handles:
                handles[path] = safe_open(path, "pt", device="cpu")
            sl = handles[path].get_slice(by_ours[name])
            if tuple(sl.get_shape()) != tuple(p.shape):
                raise InitFromError(
                    f"model.init_from={hf_dir}: {by_ours[name]} has shape {sl.get_shape()}, "
                    f"the model's {name} is {list(p.shape)}"
                )
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.numel():
                local.copy_(sl[_local_slices(p)])
    finally:
        handles.clear()


__all__ = ["InitFromError", "check_shapes", "load_init_weights", "weight_files"]
