"""The OPT decoder (Zhang et al. 2022; metaseq; HF `OPTForCausalLM`) as one plain nn.Module.

No parallelism lives here: `parallelize.py` applies tensor parallel, FSDP, activation
checkpointing and compile to this module from outside. Parameter names follow HF's OPT
(without the `model.decoder.` prefix) so interop is a rename, not a reshuffle.

OPT facts encoded below: learned positions with an offset of 2 (2050 rows for 2048 tokens);
pre-LayerNorm with a final LayerNorm, except 350m (post-LayerNorm, no final LayerNorm, 512-wide
embeddings with bias-free project_in/out); ReLU FFN; dropout after attention and FFN but none on
embeddings; attention dropout; input and output embeddings tied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from opt_train.config import ModelConfig

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
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))

    @property
    def head_dim(self) -> int:
        return self.q_proj.in_features // self.n_heads


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
            x = x + F.dropout(
                self.self_attn(self.self_attn_layer_norm(x)), self.dropout, self.training
            )
            h = self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))
            return x + F.dropout(h, self.dropout, self.training)
        # 350m: post-LayerNorm
        x = self.self_attn_layer_norm(x + F.dropout(self.self_attn(x), self.dropout, self.training))
        h = self.fc2(F.relu(self.fc1(x)))
        return self.final_layer_norm(x + F.dropout(h, self.dropout, self.training))


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

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """OPT's init: normal(0, 0.006) everywhere; each block's output projections (attention
        out, fc2) scaled by 1/sqrt(2L); biases zero; LayerNorm weight 1."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                s = out_std if last in ("out_proj", "fc2") else std
                module.weight.normal_(0.0, s, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states in the embedding width, before the tied output projection."""
        t = input_ids.shape[1]
        if t > self.cfg.max_positions:
            raise ValueError(
                f"sequence of {t} tokens exceeds model.max_positions={self.cfg.max_positions}"
            )
        x = self.embed_tokens(input_ids)
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

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab]. Training uses `loss`, which never holds them all."""
        return F.linear(self.hidden_states(input_ids), self.embed_tokens.weight)

    def loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        chunk_tokens: int = 4096,
        grad_scale: float = 1.0,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy through the tied output projection, in chunks;
        `grad_scale` is the factor the caller multiplies this loss by before backward."""
        h = self.hidden_states(input_ids)
        return chunked_cross_entropy(
            h.reshape(-1, h.shape[-1]),
            self.embed_tokens.weight,
            targets.reshape(-1),
            chunk_tokens,
            grad_scale,
        )


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` without keeping [tokens, vocab] logits.

    Forward walks the tokens in chunks: logits for one chunk (in fp32), the loss, and at once
    the gradients w.r.t. hidden and weight (softmax - onehot); only those are kept. For OPT's
    50,272-word vocabulary the fp32 logits of a micro-batch are otherwise the largest
    activation of the step (8 x 2048 tokens: 6.6 GB).

    `grad_scale` is the gradient the caller will send back (the fp16 loss scale divided by the
    accumulation steps): the gradients are formed already multiplied by it, so in fp16 they do
    not underflow before backward sees the scale. Backward divides it out again.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, grad_scale: float):
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        w = weight.to(hidden.dtype)
        rows = torch.arange(min(n, chunk_tokens), device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            y = targets[start : start + chunk_tokens]
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / n
            g = torch.exp_(logits.sub_(lse[:, None]))
            g[rows[: len(y)], y] -= 1.0
            g = g.mul_(grad_scale / n).to(hidden.dtype)
            if grad_h is not None:
                torch.mm(g, w, out=grad_h[start : start + chunk_tokens])
            if g.dtype == torch.float32:
                grad_w.addmm_(g.t(), h)
            else:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.grad_scale = grad_scale
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        factor = grad_out / ctx.grad_scale
        gh = None if grad_h is None else grad_h * factor.to(grad_h.dtype)
        return gh, (grad_w * factor).to(ctx.weight_dtype), None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = 4096,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Mean cross-entropy of logits `hidden @ weight.T` against `targets` (all tokens count).

    Under autocast the projection runs in the autocast dtype, as a Linear would."""
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_tokens, grad_scale)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
