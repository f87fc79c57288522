"""`OptLM`: lm-evaluation-harness's model interface over our own OPT, sharded or not.

lm-eval turns every task into requests: `loglikelihood` (a context and a continuation: the
continuation's log-probability and whether greedy decoding would produce it) and
`loglikelihood_rolling` (a whole text's log-probability, in windows of the model's length).
Tokenization follows lm-eval's own `hf` model exactly (TemplateLM's context/continuation split,
the tokenizer's BOS rule, the same rolling windows), so a task scores the same token sequences
as `lm_eval --model hf` on the run's HF export (tests/opt_train/test_downstream.py checks it).

How the token sequences are scored:
- Reuse: one forward of a sequence scores every request whose tokens are a prefix of it (the
  choices of a multiple-choice question that share their context and first words, a rolling
  window inside a longer one): in lexicographic order a prefix sits right before the
  sequences it begins, so one pass finds each sequence's longest extension. Causal
  attention makes the prefix's log-probabilities the same function of the same tokens.
- Batches: the remaining sequences sorted by length, `batch_size` at a time, right-padded (a
  padded position never reaches an earlier one through causal attention). Different
  requests never share a row: packing them would let one attend to the other.
- Sharding: batch i goes to data-parallel rank i % dp; the batches are formed before they are
  dealt out, so every request is computed in the same batch whatever the world size. Tensor-
  parallel peers compute the same batches together: the output projection stays split over
  the vocabulary and the log-softmax statistics are all-reduced (as the training loss does,
  opt_train/engine/loss.py). Ranks with fewer batches run empty forwards, because FSDP's
  all-gathers need every rank in every forward. The per-token scores are then gathered on
  every rank, so lm-eval, which sees one process (rank 0 of 1), computes the same metrics
  everywhere.
- Precision: the forward runs under the run's autocast; the output projection and the
  log-softmax in fp32, as lm-eval's `hf` model does with an fp32 model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import has_bos_prefix
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from opt_train.engine.precision import autocast
from opt_train.parallel.process_groups import each_rank

Tokens = tuple[int, ...]
# Positions whose fp32 logits exist at once (x 50,272 x 4 bytes: 400 MB), as the training
# loss's `train.loss_chunk_tokens` default.
SCORE_CHUNK_TOKENS = 2048


def token_scores(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether the target is the most likely token, at each position
    ([batch, seq] each), from the final hidden states and the tied output weight. A weight
    split over the vocabulary (a DTensor, tensor parallel) is used as it is: max, sum-exp and
    the target's logit are all-reduced over its group. The logits of SCORE_CHUNK_TOKENS
    positions at a time: a whole batch's fp32 [tokens, 50272] would be the largest tensor of
    the evaluation."""
    group, vocab_start = None, 0
    if isinstance(hidden, DTensor):
        hidden = hidden.full_tensor()
    if isinstance(weight, DTensor):
        group = weight.device_mesh.get_group()
        vocab_start = weight.device_mesh.get_local_rank() * weight.to_local().shape[0]
        weight = weight.to_local()
    w = weight.float()
    v_local = w.shape[0]
    h, y_all = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1) - vocab_start
    logprobs = torch.empty(y_all.shape, dtype=torch.float32, device=hidden.device)
    greedy = torch.empty(y_all.shape, dtype=torch.bool, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, h.shape[0], SCORE_CHUNK_TOKENS):
            part = slice(start, start + SCORE_CHUNK_TOKENS)
            logits = h[part].float() @ w.T  # [chunk, v_local]
            top = logits.max(dim=-1).values
            if group is None:
                log_z = torch.logsumexp(logits, dim=-1)  # one fused pass
            else:
                _all_reduce(top, group, dist.ReduceOp.MAX)
                sum_exp = (logits - top[:, None]).exp().sum(dim=-1)
                _all_reduce(sum_exp, group)
                log_z = top + sum_exp.log()
            y = y_all[part]
            mine = (y >= 0) & (y < v_local)
            target_logit = logits.gather(1, torch.where(mine, y, 0)[:, None])[:, 0]
            target_logit = torch.where(mine, target_logit, 0.0)
            _all_reduce(target_logit, group)
            logprobs[part] = target_logit - log_z
            # lm-eval's `hf` model asks argmax == target; a tie with another token (equal fp32
            # logits) counts as greedy here, there only when the target has the lower id.
            greedy[part] = target_logit >= top
    return logprobs.view(targets.shape), greedy.view(targets.shape)


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)


def longest_extensions(seqs: Sequence[Tokens]) -> dict[Tokens, Tokens]:
    """Each distinct sequence -> the longest sequence of `seqs` that begins with it (itself
    when none does). In sorted order the sequences that begin with `s` follow `s` directly,
    so `s`'s extension is its successor's when `s` is a prefix of that successor."""
    order = sorted(set(seqs))
    out: dict[Tokens, Tokens] = {}
    for i in range(len(order) - 1, -1, -1):
        s = order[i]
        nxt = order[i + 1] if i + 1 < len(order) else ()
        out[s] = out[nxt] if len(nxt) > len(s) and nxt[: len(s)] == s else s
    return out


class OptLM(TemplateLM):
    """lm-eval's model over our OPT (plain, FSDP2, TP or both), forward only.

    `model(input_ids, head=...)` is the OPT module as the trainer built it; `tokenizer` the run's
    HF tokenizer (`opt_train.model.hf.hf_tokenizer`); `max_length` the model's positions;
    `precision` the autocast the forward runs under; `dp_rank` / `dp_size` this rank's share of
    the batches (tensor-parallel peers pass the same `dp_rank`)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_length: int,
        device: torch.device,
        precision: str = "fp32",
        batch_size: int = 16,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._max_length = max_length
        self._device = device
        self.precision = precision
        self.batch_size = batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sequences_scored = 0  # forward rows this rank ran, for the benchmark's rate

    # -- what lm-eval asks of a model -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # lm-eval's `hf` model: the BOS token before an empty context (our separator)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """As lm-eval's `hf` model encodes: the tokenizer's own BOS rule (our exports prepend
        the separator, as the model saw it before every document), unless the text already
        starts with it or the caller says otherwise."""
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens, **kwargs)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], **kwargs
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether every continuation token is
        the argmax) per (key, context ids, continuation ids), in request order. Inputs longer
        than the model are cut on the left, as lm-eval's `hf` model cuts them."""
        seqs: list[Tokens] = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens is longer than the model's "
                    f"{self.max_length} positions"
                )
            seqs.append(tuple((context + continuation)[-(self.max_length + 1) :]))
        extension = longest_extensions(seqs)
        scores = self._score(sorted(set(extension.values()), key=lambda s: (-len(s), s)))
        out = []
        for (key, _, continuation), seq in zip(requests, seqs, strict=True):
            logprobs, greedy = scores[extension[seq]]
            end = len(seq) - 1  # the position that predicts the last token
            span = slice(end - len(continuation), end)
            answer = (float(logprobs[span].sum()), bool(greedy[span].all()))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A text's log-probability in disjoint windows of the model's length, each after one
        token of context (the BOS token for the first), as lm-eval's `hf` model does."""
        windows: list[tuple[None, list[int], list[int]]] = []
        counts = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            mine = [(None, *lm_utils.make_disjoint_window(w)) for w in rolling]
            windows += mine
            counts.append(len(mine))
        scores = self._loglikelihood_tokens(windows)
        out, i = [], 0
        for request, n in zip(requests, counts, strict=True):
            total = sum(s for s, _ in scores[i : i + n])
            i += n
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        task = requests[0].task_name if requests else "?"
        raise NotImplementedError(
            f"task {task!r} generates text (output_type generate_until); opt-train's lm-eval "
            "model scores log-likelihoods only: choose loglikelihood or multiple_choice tasks"
        )

    # -- forwards ---------------------------------------------------------------------------

    def _score(self, units: list[Tokens]) -> dict[Tokens, tuple[torch.Tensor, torch.Tensor]]:
        """Per-token scores of every unit ([len - 1] log-probabilities and greedy flags), on
        every rank; this rank computes batches dp_rank, dp_rank + dp, ..."""
        batches = [units[i : i + self.batch_size] for i in range(0, len(units), self.batch_size)]
        rounds = math.ceil(len(batches) / self.dp_size)
        was_training = self.model.training
        self.model.eval()
        mine: list[tuple[int, list[float], list[bool]]] = []
        try:
            for r in range(rounds):
                b = r * self.dp_size + self.dp_rank
                batch = batches[b] if b < len(batches) else [(0, 0)]  # an empty forward
                logprobs, greedy = self._forward(batch)
                if b >= len(batches):
                    continue
                self.sequences_scored += len(batch)
                for j, seq in enumerate(batch):
                    n = len(seq) - 1
                    mine.append(
                        (b * self.batch_size + j, logprobs[j, :n].tolist(), greedy[j, :n].tolist())
                    )
        finally:
            self.model.train(was_training)
        out = {}
        for part in each_rank(mine):
            for index, logprobs, greedy in part:
                out[units[index]] = (torch.tensor(logprobs), torch.tensor(greedy))
        return out

    @torch.no_grad()
    def _forward(self, batch: list[Tokens]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(s) for s in batch) - 1)
        inputs = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(batch):
            inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
            targets[i, : len(s) - 1] = torch.tensor(s[1:])
        inputs, targets = inputs.to(self._device), targets.to(self._device)
        head: Callable = lambda h, w: token_scores(h, w, targets)  # noqa: E731
        with autocast(self.precision, self._device.type):
            logprobs, greedy = self.model(inputs, head=head)
        return logprobs.cpu(), greedy.cpu()
