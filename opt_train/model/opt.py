"""The OPT decoder (Zhang et al. 2022; metaseq; HF `OPTForCausalLM`) as one plain nn.Module.

No parallelism lives here: `opt_train/parallel/apply.py` applies tensor parallel, FSDP, activation
checkpointing and compile to this module from outside. Parameter names follow HF's OPT
(without the `model.decoder.` prefix) so interop is a rename, not a reshuffle.

OPT facts encoded below: learned positions with an offset of 2 (2050 rows for 2048 tokens);
pre-LayerNorm with a final LayerNorm, except 350m (post-LayerNorm, no final LayerNorm, 512-wide
embeddings with bias-free project_in/out); ReLU FFN; dropout after attention and FFN but none on
embeddings; attention dropout; input and output embeddings tied.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from opt_train.config import ModelConfig
from opt_train.model.dropout import dropout, keep_mask, keep_threshold, uses_bulk_dropout

POSITION_OFFSET = 2  # fairseq reserved the first two position rows (padding idx 1 + 1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallel the projections hold a slice of the heads.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if p > 0.0 and uses_bulk_dropout(q):
            y = causal_attention_with_dropout(q, k, v, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))

    @property
    def head_dim(self) -> int:
        return self.q_proj.in_features // self.n_heads


def causal_attention_with_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float
) -> torch.Tensor:
    """Causal softmax attention with dropout on the probabilities, written out for CPU.

    SDPA with dropout_p > 0 leaves its fused CPU kernel for the math path (in bf16 it also
    upcasts to fp32) and drops with `bernoulli_`, one draw per element of [batch, heads, T, T].
    Here the scores, scale and causal mask are one `baddbmm` (the mask as a -inf bias, so no
    masked_fill in forward or backward), the probabilities are dropped with bulk random bits
    (opt_train/model/dropout.py) by `where`, which keeps a boolean mask for backward, and the
    1 / keep-probability scale is applied to the [.., T, head_dim] output instead of the
    [.., T, T] probabilities.
    """
    b, h, t, d = q.shape
    future = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    q, k, v = (z.reshape(b * h, t, d) for z in (q, k, v))
    probs = torch.softmax(torch.baddbmm(future, q, k.transpose(1, 2), alpha=d**-0.5), dim=-1)
    if p > 0.0:
        probs = torch.where(keep_mask(probs.shape, p), probs, 0.0)
    y = probs @ v
    if p > 0.0:
        y = y * (1.0 / keep_threshold(p)[1])
    return y.view(b, h, t, d)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_layer_norm = cfg.pre_layer_norm
        self.dropout = cfg.dropout
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_layer_norm:
            x = x + dropout(
                self.self_attn(self.self_attn_layer_norm(x)), self.dropout, self.training
            )
            h = self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))
            return x + dropout(h, self.dropout, self.training)
        # 350m: post-LayerNorm
        x = self.self_attn_layer_norm(x + dropout(self.self_attn(x), self.dropout, self.training))
        h = self.fc2(F.relu(self.fc1(x)))
        return self.final_layer_norm(x + dropout(h, self.dropout, self.training))


class OPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.embed_positions = nn.Embedding(cfg.max_positions + POSITION_OFFSET, cfg.d_model)
        proj = cfg.embed_dim != cfg.d_model
        self.project_in = nn.Linear(cfg.embed_dim, cfg.d_model, bias=False) if proj else None
        self.project_out = nn.Linear(cfg.d_model, cfg.embed_dim, bias=False) if proj else None
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_layer_norm else None
        self.init_weights()

    def init_std(self, name: str) -> float | None:
        """OPT's init for parameter `name`: the std of its normal draw, or None for the
        constants (biases zero, LayerNorm weight one). Output projections of each block
        (attention out, fc2) use 0.006 / sqrt(2L)."""
        if name.endswith("bias") or "layer_norm" in name:
            return None
        if name.endswith(("out_proj.weight", "fc2.weight")):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        return self.cfg.init_std

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        for name, p in self.named_parameters():
            std = self.init_std(name)
            if std is not None:
                p.normal_(0.0, std, generator=generator)
            else:
                p.fill_(1.0 if "layer_norm" in name and name.endswith("weight") else 0.0)

    def hidden_states(self, input_ids: torch.Tensor, tied_output: bool = False) -> torch.Tensor:
        """Final hidden states in the embedding width, before the tied output projection.
        `tied_output`: the caller projects them through the tied embedding (see `embed`)."""
        t = input_ids.shape[1]
        if t > self.cfg.max_positions:
            raise ValueError(
                f"sequence of {t} tokens exceeds model.max_positions={self.cfg.max_positions}"
            )
        x = self.embed(input_ids, tied_output)
        if self.project_in is not None:
            x = self.project_in(x)
        pos = torch.arange(POSITION_OFFSET, t + POSITION_OFFSET, device=input_ids.device)
        x = x + self.embed_positions(pos)
        for layer in self.layers:
            x = layer(x)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def embed(self, input_ids: torch.Tensor, tied_output: bool) -> torch.Tensor:
        """Token embeddings. When the tied output projection follows (`tied_output`), the
        weight is a plain CPU tensor and the batch has fewer tokens than the vocabulary, the
        lookup's gradient is sparse (the batch's rows only): autograd adds it into the
        projection's dense [vocab, width] gradient, where a dense lookup gradient would be a
        zero-filled [vocab, width] tensor summed with it (docs/benchmarks.md). Without
        the projection the weight's gradient would stay sparse, which the fused AdamW and
        gradient clipping refuse, hence the flag. The module is still what is called, so hooks
        on it run."""
        weight = self.embed_tokens.weight
        self.embed_tokens.sparse = (
            tied_output and input_ids.numel() < weight.shape[0] and uses_bulk_dropout(weight)
        )
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] through the output projection tied to the token embedding.

        `head(hidden, weight)` replaces that projection: the trainer's loss
        (opt_train/engine/loss.py) takes the final hidden states and the tied weight and computes
        the cross-entropy in chunks, so full-vocabulary logits never exist. It is called here,
        inside the forward, because FSDP2 and ZeRO-3 gather the embedding weight only for the
        model's forward."""
        h = self.hidden_states(input_ids, tied_output=True)
        if head is None:
            return F.linear(h, self.embed_tokens.weight)
        return head(h, self.embed_tokens.weight)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's full shape, by `named_parameters` name, read from the real module built
    on the meta device (no memory), so counts and plans cannot drift from this file."""
    return dict(_param_shapes(dataclasses.astuple(cfg)))


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg_fields: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Cached: building OPT-175B takes seconds even on the meta device (docs/benchmarks.md,
    # "Numbers behind code comments"), and the trainer's log, the console header and planner
    # sweeps all ask.
    with torch.device("meta"):
        model = OPT(ModelConfig(*cfg_fields))
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the whole model (the tied output projection counted once)."""
    return sum(math.prod(s) for s in param_shapes(cfg).values())
