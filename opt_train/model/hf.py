"""Hugging Face interop: our model <-> `transformers.OPTForCausalLM`, in memory.

Our parameter names are HF's without the `model.decoder.` prefix, and HF ties `lm_head` to
`embed_tokens`, so conversion is a rename. Writing an HF directory (tokenizer, sharded
safetensors, the export record) is `opt_train.tools.hf_export`; `opt_train.model.hf` keeps the
public `load_hf` / `save_hf` names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline.files import sha256_file
from opt_train.config import ModelConfig
from opt_train.model.opt import OPT

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


@dataclass(frozen=True)
class SpecialTokens:
    """OPT's own ids by default: `</s>` (2) separates documents and starts each one, `<pad>` 1."""

    bos: int = 2
    eos: int = 2
    pad: int = 1


HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_config_from_model_config(
    cfg: ModelConfig, tokens: SpecialTokens = SpecialTokens(), dtype: str = "fp32"
):
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
        pad_token_id=tokens.pad,
        bos_token_id=tokens.bos,
        eos_token_id=tokens.eos,
        architectures=["OPTForCausalLM"],
        dtype=HF_DTYPE_NAMES[dtype],
    )


def our_name(hf_name: str) -> str | None:
    """Our parameter name for an HF OPT tensor name; None for the tied `lm_head.weight`.
    facebook/opt-* files name them `decoder.*` (no `model.` prefix); transformers writes
    `model.decoder.*`."""
    if hf_name == "lm_head.weight":
        return None
    for prefix in (HF_PREFIX, "decoder."):
        if hf_name.startswith(prefix):
            return hf_name[len(prefix) :]
    raise KeyError(f"unexpected parameter {hf_name!r} in an OPT state dict")


def from_hf_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: v for k, v in hf_state.items() if (n := our_name(k)) is not None}


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


# -- the tokenizer of the training data, as an HF tokenizer --------------------------------


def _merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def tokenizer_files(record: dict) -> tuple[Path, Path]:
    """(vocab, merges) of the tokenizer a shard manifest names, checked against the sha256
    the manifest recorded, so the export writes the very vocabulary that made the data."""
    from data_pipeline.tokenizer import gpt2_files_dir

    if record["name"] == "gpt2":
        d = gpt2_files_dir()
        files = {"encoder.json": d / "encoder.json", "vocab.bpe": d / "vocab.bpe"}
    else:
        if not record.get("path"):
            # `data.tokenizer=opt` on foreign data names OPT's ids but not where its files are.
            raise ValueError(
                f"the training data's tokenizer record ({record['name']!r}) says where no "
                "vocabulary files are, so the export cannot write a tokenizer; train with "
                "data.tokenizer=<directory with vocab.json and merges.txt>, or export with --data "
                "naming shards tokenized with the same vocabulary"
            )
        d = Path(record["path"])
        files = {"vocab.json": d / "vocab.json", "merges.txt": d / "merges.txt"}
    for key, f in files.items():
        if not f.is_file():
            raise FileNotFoundError(
                f"the data was tokenized with {record['name']!r} files from {d}, but {f} is "
                "missing here; export where those files are"
            )
        want = record.get("files", {}).get(key)
        if want and sha256_file(f) != want:
            raise ValueError(
                f"{f} is not the file that tokenized the training data (sha256 differs from "
                "the shard manifest's); the export would describe another vocabulary"
            )
    vocab, merges = files.values()
    return vocab, merges


def hf_tokenizer(record: dict, model_vocab: int, max_positions: int) -> tuple[Any, SpecialTokens]:
    """The HF tokenizer of a shard manifest's `tokenizer` record, and its ids: what an export
    writes (opt_train.tools.hf_export) and what downstream evaluation encodes text with
    (opt_train.downstream), so both see the same ids.

    Both keep the data's separator as BOS and EOS and prepend it to every text (the
    `add_bos_token` of OPT's own tokenizer): in the shards every document but the first follows
    a separator, so that is what the model saw before a document. GPT-2 has no padding token;
    `<pad>` is added as id 50257, one of the rows that pad the vocabulary to 50,272 and that
    the data never uses (or the separator, when the model has no such row)."""
    from transformers import GPT2Tokenizer

    vocab_path, merges_path = tokenizer_files(record)
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    if record["name"] == "gpt2":
        sep = "<|endoftext|>"
        special = {"bos_token": sep, "eos_token": sep, "unk_token": sep}
        special["pad_token"] = "<pad>" if model_vocab > len(vocab) else sep
    else:
        special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>"}
        special["pad_token"] = "<pad>"
    tok = GPT2Tokenizer(
        vocab=vocab,
        merges=_merges(merges_path),
        add_bos_token=True,
        model_max_length=max_positions,
        **special,
    )
    ids = SpecialTokens(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    if ids.eos != record["eos_id"] or max(ids.bos, ids.eos, ids.pad) >= model_vocab:
        raise ValueError(
            f"tokenizer {record['name']!r}: separator id {ids.eos} (pad {ids.pad}) does not "
            f"agree with the shards' eos_id {record['eos_id']} and a {model_vocab}-row model"
        )
    return tok, ids
