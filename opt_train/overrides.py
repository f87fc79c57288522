"""Command-line overrides checked against the typed schema before Hydra composes them.

Hydra rejects an unknown key or a bad choice too, but its messages do not say what would have
been valid; these name the valid keys (and the closest match) and a key's choices, read from
the same tables the config sections check in `__post_init__` (opt_train/config/sections.py).
"""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from typing import Any

from data_pipeline.config_limits import OneOf, Range
from opt_train import config as schema


def _schema_keys(cls: type) -> dict[str, Any]:
    return {f.name: f for f in fields(cls)}


def check_overrides(overrides: list[str]) -> None:
    """Fail fast on a command-line key that is not in the schema, naming the valid keys, and on
    a value outside a key's choices, naming them (from the tables `__post_init__` checks).

    Group selections (`+model=...`), deletions and `hydra.*` keys are left to Hydra.
    """
    for ov in overrides:
        if "=" not in ov or ov.startswith(("+", "~", "hydra.", "hydra/", "-")):
            continue
        key, value = ov.split("=", 1)
        limit = _limit_of(key)
        value = value.strip().strip("'\"")
        # An interpolation (${...}) is checked by __post_init__ once resolved.
        if isinstance(limit, OneOf) and not value.startswith("$"):
            if value not in {str(c) for c in limit.choices}:
                # The words __post_init__ would use, without composing the whole config first.
                shown: object = value
                if value.lstrip("-").isdigit() and all(isinstance(c, int) for c in limit.choices):
                    shown = int(value)
                raise SystemExit(
                    f"error: invalid config: {key} must be {limit.describe()}, got {shown!r}"
                )


def _limit_of(key: str) -> Range | OneOf | None:
    """The declared limit of `key` (None when it has none); exits naming the valid keys, and
    the closest, at the first part of `key` that is not in the schema."""
    cls: Any = schema.JobConfig
    walked: list[str] = []
    for part in key.split("."):
        if cls is None:  # inside a list or dict field: Hydra checks the rest
            return None
        known = _schema_keys(cls)
        if part not in known:
            where = ".".join(walked) or "the top level"
            close = difflib.get_close_matches(part, known, n=1)
            hint = f" Did you mean '{'.'.join([*walked, close[0]])}'?" if close else ""
            raise SystemExit(
                f"error: unknown config key '{key}'.{hint}\n"
                f"Valid keys at {where}: {', '.join(sorted(known))}"
            )
        walked.append(part)
        cls = _resolve_type(known[part].type)
    return schema.LIMITS.get(".".join(walked[:-1]), {}).get(walked[-1])


def _resolve_type(ftype: Any) -> type | None:
    """The dataclass behind a field annotation (annotations are strings under __future__)."""
    if isinstance(ftype, str):
        ftype = getattr(schema, ftype, None)
    return ftype if is_dataclass(ftype) else None
