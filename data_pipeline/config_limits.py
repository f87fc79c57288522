"""The allowed values of config keys, declared as tables and checked by one function.

Every config dataclass (the training job's in opt_train/config/, each pipeline stage's) lists
its numeric ranges and its choices in a `{field: Range | OneOf}` table and calls
`check_limits(self, section, table)` from `__post_init__`, so a bad value stops the run at
start-up with the key, the value and what is allowed, before anything is built. It lives here,
in the lower layer, because opt_train imports data_pipeline and never the other way round.

NaN fails every range: it compares false with any bound, and a float is also required to be
finite unless the range is open-ended with `finite=False`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """lo <= v (lo < v when `lo_open`), v <= hi (v < hi when `hi_open`); `also` lists values
    allowed besides (dp_shard's -1); `null` allows None (a derived default)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()
    null: bool = False
    finite: bool = True

    def allows(self, v: Any) -> bool:
        if v is None:
            return self.null
        if v in self.also:
            return True
        if isinstance(v, float) and (math.isnan(v) or (self.finite and math.isinf(v))):
            return False
        if self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {self.hi}"
        else:
            text = "a finite number"
        for extra in self.also:
            text = f"{extra} or {text}"
        return text + (" or null (derived)" if self.null else "")


@dataclass(frozen=True)
class OneOf:
    """One of a fixed list of values (the only definition of that list)."""

    choices: tuple

    def allows(self, v: Any) -> bool:
        return v in self.choices

    def describe(self) -> str:
        *first, last = (str(c) for c in self.choices)
        return f"{', '.join(first)} or {last}" if first else last


POSITIVE = Range(0, lo_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, hi_open=True)  # [0, 1): dropout, betas


def check_limits(obj: Any, section: str, table: Mapping[str, Range | OneOf]) -> None:
    """Raise ValueError naming `section.key`, the allowed values and the value, for the first
    field of `obj` outside its entry in `table`."""
    for key, limit in table.items():
        value = getattr(obj, key)
        if not limit.allows(value):
            name = f"{section}.{key}" if section else key
            raise ValueError(f"{name} must be {limit.describe()}, got {value!r}")


__all__ = [
    "AT_LEAST_1",
    "FRACTION",
    "NON_NEGATIVE",
    "POSITIVE",
    "OneOf",
    "Range",
    "check_limits",
]
