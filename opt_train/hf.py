"""Hugging Face interop: our model <-> `transformers.OPTForCausalLM`.

Our parameter names are HF's without the `model.decoder.` prefix, and HF ties `lm_head` to
`embed_tokens`, so conversion is a rename. Weights are written as safetensors and read with
safetensors or `torch.load(weights_only=True)` by transformers; nothing executes code from a file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from opt_train.config import ModelConfig
from opt_train.model import OPT

HF_PREFIX = "model.decoder."


def model_config_from_hf(hf_config) -> ModelConfig:
    if getattr(hf_config, "activation_function", "relu") != "relu":
        raise ValueError(f"only ReLU OPT models are supported, got {hf_config.activation_function}")
    if getattr(hf_config, "_remove_final_layer_norm", False):
        raise ValueError("OPT configs with _remove_final_layer_norm=True are not supported")
    if not getattr(hf_config, "enable_bias", True) or not getattr(
        hf_config, "layer_norm_elementwise_affine", True
    ):
        raise ValueError(
            "OPT configs without biases or LayerNorm affine parameters are not supported"
        )
    return ModelConfig(
        name=getattr(hf_config, "_name_or_path", "") or "opt-hf",
        vocab_size=hf_config.vocab_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        d_model=hf_config.hidden_size,
        ffn_dim=hf_config.ffn_dim,
        max_positions=hf_config.max_position_embeddings,
        word_embed_proj_dim=hf_config.word_embed_proj_dim,
        pre_layer_norm=hf_config.do_layer_norm_before,
        dropout=hf_config.dropout,
        attention_dropout=hf_config.attention_dropout,
        init_std=hf_config.init_std,
    )


def hf_config_from_model_config(cfg: ModelConfig):
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        ffn_dim=cfg.ffn,
        num_attention_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_positions,
        do_layer_norm_before=cfg.pre_layer_norm,
        word_embed_proj_dim=cfg.embed_dim,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_function="relu",
        init_std=cfg.init_std,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        architectures=["OPTForCausalLM"],
    )


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {HF_PREFIX + k: v for k, v in state_dict.items()}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in hf_state.items():
        if k == "lm_head.weight":
            continue  # tied to embed_tokens
        if not k.startswith(HF_PREFIX):
            raise KeyError(f"unexpected parameter {k!r} in an OPT state dict")
        out[k[len(HF_PREFIX) :]] = v
    return out


def load_hf(path_or_model) -> tuple[OPT, ModelConfig]:
    """A project model from an HF OPT directory (or an `OPTForCausalLM` instance)."""
    from transformers import OPTForCausalLM

    hf = path_or_model
    if not isinstance(hf, OPTForCausalLM):
        hf = OPTForCausalLM.from_pretrained(str(path_or_model), dtype=torch.float32)
    cfg = model_config_from_hf(hf.config)
    with torch.device("meta"):
        model = OPT(cfg)
    model.load_state_dict(from_hf_state_dict(hf.state_dict()), strict=True, assign=True)
    if "lm_head.weight" in hf.state_dict() and not torch.equal(
        hf.state_dict()["lm_head.weight"], model.embed_tokens.weight
    ):
        raise ValueError("lm_head is not tied to embed_tokens; OPT ties them")
    return model, cfg


def save_hf(model: OPT, model_config: ModelConfig, out_dir: str | Path) -> Path:
    """Write an HF directory (config.json + model.safetensors) that
    `transformers.OPTForCausalLM.from_pretrained` loads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config_from_model_config(model_config).save_pretrained(out)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(to_hf_state_dict(state), out / "model.safetensors", metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m opt_train.hf CHECKPOINT OUT_DIR`: export a training checkpoint to HF."""
    from opt_train.checkpoint import load_model_for_export

    p = argparse.ArgumentParser(prog="python -m opt_train.hf", description=main.__doc__)
    p.add_argument("checkpoint", help="a run_dir, its checkpoints/ dir, or one checkpoint dir")
    p.add_argument("out_dir", help="where to write the HF model directory")
    args = p.parse_args(argv)
    model, cfg = load_model_for_export(args.checkpoint)
    save_hf(model, cfg, args.out_dir)
    print(json.dumps({"exported": str(args.out_dir), "model": cfg.name}))


if __name__ == "__main__":
    main()
