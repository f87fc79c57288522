"""Which documents are held out for validation: one rule for our tokenize stage and for
foreign token data.

- A document with an id (our JSONL documents; an HF dataset with an `id` column) goes to
  validation when blake2b(seed, "split", id) / 2**64 < fraction: the same document lands in the
  same split whichever tool tokenized it, so a corpus tokenized here and elsewhere never trains
  on the other's validation documents.
- A document without an id (datatrove `.ds`, Megatron `.bin/.idx`, an HF dataset without `id`)
  goes to validation when splitmix64(seed, n) / 2**64 < fraction, n being its position in the
  whole input (files in name order, documents in stored order): a spread-out sample, not a tail
  that may be one source, computed for a billion documents in seconds (vectorised).
"""

from __future__ import annotations

import hashlib

import numpy as np

# splitmix64's constants (Steele, Lea & Flood 2014, as in java.util.SplittableRandom).
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def unit_hash(seed: int, doc_id: str, purpose: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, id, purpose): split and weight decisions."""
    h = hashlib.blake2b(f"{seed}\0{purpose}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def is_validation(doc_id: str, fraction: float, seed: int) -> bool:
    return fraction > 0 and unit_hash(seed, doc_id, "split") < fraction


def index_unit_hash(first: int, count: int, seed: int) -> np.ndarray:
    """unit numbers in [0, 1) of documents first .. first + count - 1 (splitmix64)."""
    with np.errstate(over="ignore"):
        z = np.arange(first, first + count, dtype=np.uint64) + np.uint64(seed + 1) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def validation_by_index(first: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: which of documents first .. first + count - 1 are held out."""
    if fraction <= 0:
        return np.zeros(count, dtype=bool)
    return index_unit_hash(first, count, seed) < fraction


def validation_by_id(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    return np.fromiter((is_validation(str(i), fraction, seed) for i in ids), bool, len(ids))


RULE_BY_ID = "validation iff blake2b(seed, 'split', id) / 2**64 < validation_fraction"
RULE_BY_INDEX = (
    "validation iff splitmix64(seed, document number) / 2**64 < validation_fraction "
    "(documents numbered over the files in name order)"
)
