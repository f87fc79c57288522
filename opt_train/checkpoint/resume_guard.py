"""What a resume may change: the new config against the one saved in the checkpoint.

Re-running into a `run_dir` resumes from its newest checkpoint, so a command that differs from
the first one would silently continue another experiment. Before any weight is read, every key
of the running config is compared with the checkpoint's `config.yaml`:

- The model's shape and the data (which shards, the sequence length, the seed that orders them;
  the tokenizer is the data's) can never change: the weights or the sample order would not
  continue. Such a change is refused, naming each key with its old and new value.
- Keys that decide nothing about the numbers trained (where and how often to log and save, the
  mesh, which device, evaluation, export) change freely.
- `train.max_steps` may always change (grow, or come nearer: the LR schedule is in tokens, so it
  only says where to stop), and so may `data.skip_steps`, `optim.lr_changes` and
  `optim.clip_changes` (replaying past bad data by hand); all are recorded as events.
- `precision: auto` is compared by what it resolved to where one side is explicit; `auto` on
  both sides resolving differently (bf16 there, fp32 here) is no change, only a log line.
- Anything else (LR, clipping, schedule, precision, dropout, batch...) is refused unless the
  key, or its group, is listed in `checkpoint.allow_changes`: OPT lowered its LR and its
  clipping threshold on restarts, deliberately. An allowed change becomes an event row
  `{"event": "config_change", "step", "key", "old", "new"}` in metrics.jsonl.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from opt_train.config import JobConfig

log = logging.getLogger(__name__)

NEVER = (
    "model.vocab_size",
    "model.n_layers",
    "model.n_heads",
    "model.d_model",
    "model.ffn_dim",
    "model.max_positions",
    "model.word_embed_proj_dim",
    "model.pre_layer_norm",
    "data.path",
    "data.sources",
    "data.seq_len",
    "train.seed",
)
FREE = (
    "run_dir",
    # The engine's own format check refuses a checkpoint of another engine (checkpoint.load);
    # ZeRO stage and offload change where state lives, not the numbers.
    "engine",
    "deepspeed",
    "logging",
    "profile",
    # The spike-recovery policy decides future rollbacks only; its past decisions are in the
    # checkpoint (opt_train/train/callbacks/stability.py).
    "stability",
    "checkpoint",
    "parallel",
    "export",
    # Downstream evaluation reads the model and restores every RNG stream: it changes nothing
    # the run continues from (tests/opt_train/test_downstream.py).
    "downstream",
    "train.device",
    "train.num_threads",
    "train.micro_batch_size",
    "train.eval_interval",
    "train.eval_batches",
    "train.loss_chunk_tokens",
    "train.max_nonfinite_steps",
    "data.cache_dir",
    "data.verify",  # a start-up check of the same bytes
    "model.name",
    "model.init_from",
    "model.init_std",
)
# Changed freely but recorded: the LR schedule is in tokens, so max_steps only says where to
# stop (a preempted run may be given a nearer end, or a longer one).
# data.skip_steps and optim.lr_changes / clip_changes are the by-hand replay past a loss spike
# (docs/fault-tolerance.md), the same changes the automatic recovery makes.
ALWAYS_ALLOWED_EVENTS = (
    "train.max_steps",
    "data.skip_steps",
    "optim.lr_changes",
    "optim.clip_changes",
)


class ResumeRefused(ValueError):
    """The config changed in a way the checkpoint cannot continue."""


def _in(key: str, groups: tuple[str, ...] | list[str]) -> bool:
    return any(key == g or key.startswith(g + ".") for g in groups)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; lists are leaves (data.skip_steps, allow_changes)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def flat_config(yaml_text: str) -> dict[str, Any]:
    """A config.yaml as dotted keys, with schema defaults for keys it predates."""
    defaults = _flat(OmegaConf.to_container(OmegaConf.structured(JobConfig), resolve=False))
    return defaults | _flat(OmegaConf.to_container(OmegaConf.create(yaml_text), resolve=True))


def check_allow_changes(allow: list[str], keys: list[str]) -> None:
    """Every entry names a key or group of the config and none is a key that can never change."""
    groups = {k.rsplit(".", i)[0] for k in keys for i in range(k.count(".") + 1)}
    for entry in allow:
        if entry not in groups:
            close = difflib.get_close_matches(entry, sorted(groups), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ResumeRefused(f"checkpoint.allow_changes: unknown config key '{entry}'.{hint}")
        fixed = [k for k in NEVER if _in(k, [entry]) and any(_in(x, [k]) for x in keys)]
        if fixed and not _in(entry, FREE):
            raise ResumeRefused(
                f"checkpoint.allow_changes lists '{entry}', but {', '.join(fixed)} can never "
                "change on resume (the checkpoint's weights or sample order would not continue)"
            )


def check_resume(
    checkpoint: Path, current_yaml: str, allow: list[str], precision_here: str | None = None
) -> list[dict]:
    """Compare this run's config with the checkpoint's. Returns the event rows of allowed
    changes; raises `ResumeRefused` naming every refused key (old -> new). `precision_here` is
    what this run's `precision` resolved to (opt_train.engine.precision.resolve_precision)."""
    saved = flat_config((checkpoint / "config.yaml").read_text())
    now = flat_config(current_yaml)
    _compare_resolved_precision(checkpoint, saved, now, precision_here)
    check_allow_changes(allow, list(now))
    step = int(json.loads((checkpoint / "meta.json").read_text())["step"])
    never, unlisted, events = [], [], []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if old == new or _in(key, FREE):
            continue
        change = f"  {key}: {old!r} -> {new!r}"
        if _in(key, NEVER):
            never.append(change)
        elif _in(key, ALWAYS_ALLOWED_EVENTS) or _in(key, allow):
            events.append(key)
        else:
            unlisted.append(change)
    if never or unlisted:
        parts = [f"{checkpoint} (step {step}) was written with another config; not resuming."]
        if never:
            parts += ["These can never change on resume (start a new run_dir):", *never]
        if unlisted:
            keys = ",".join(line.split(":")[0].strip() for line in unlisted)
            parts += [
                "These change only when listed in checkpoint.allow_changes "
                f"(e.g. 'checkpoint.allow_changes=[{keys}]'):",
                *unlisted,
            ]
        raise ResumeRefused("\n".join(parts))
    return [
        {"event": "config_change", "step": step, "key": k, "old": saved.get(k), "new": now.get(k)}
        for k in events
    ]


def _compare_resolved_precision(
    checkpoint: Path, saved: dict[str, Any], now: dict[str, Any], here: str | None
) -> None:
    """`auto` on both sides is no change even where it resolves differently (another machine):
    say so in the log. Where one side is explicit, the resolved values are what compare: the
    same is no change; different stays a guarded change, shown as e.g. 'bf16' -> 'auto (fp32
    here)'. The checkpoint's resolved value is in its state.json (older ones: none, but they
    predate auto)."""
    old, new = saved.get("precision"), now.get("precision")
    if here is None or "auto" not in (old, new):
        return
    state = json.loads((checkpoint / "state.json").read_text())
    then = state.get("precision") if old == "auto" else old
    if old == new:
        if then and then != here:
            log.warning(
                "precision auto resolved to %s here, %s when the checkpoint was written", here, then
            )
        return
    if then == (here if new == "auto" else new):
        now["precision"] = old
    elif new == "auto":
        now["precision"] = f"auto ({here} here)"
    else:
        saved["precision"] = f"auto ({then} then)" if then else old


__all__ = ["ResumeRefused", "check_allow_changes", "check_resume", "flat_config"]
