"""The shapes of metrics.jsonl rows, for the sinks that write them (callbacks) and the tools
that read them (plot): which kind a row is, and a row as one scalar per key."""

from __future__ import annotations


def row_kind(row: dict) -> str:
    """The three kinds ("event", "eval", "step") of metrics.jsonl rows. An event row may
    carry a loss (a spike's), so "event" is looked at first."""
    if "event" in row:
        return "event"
    if "loss" in row:
        return "step"
    return "eval"


def flat_row(row: dict) -> dict:
    """A row with nested dicts flattened to "outer/inner" keys (`tokens_by_source` becomes
    `tokens_by_source/<name>`), for sinks that take one scalar per key."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}/{ik}": iv for ik, iv in flat_row(v).items()})
        else:
            out[k] = v
    return out
