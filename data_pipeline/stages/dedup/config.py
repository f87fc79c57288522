"""The stage's keys (DedupConfig), their allowed values, and the choice of bands x rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from data_pipeline.config_limits import AT_LEAST_1, NON_NEGATIVE, OneOf, Range, check_limits
from data_pipeline.kernels.choices import BACKENDS, SCHEMES
from data_pipeline.runtime import scaleout


@dataclass
class DedupConfig(scaleout.ScaleOut):
    """Keys of `python -m data_pipeline.dedup` (docs/data-dedup.md explains each); the
    scale-out keys (tasks, workers, executor, slurm) are data_pipeline.runtime.scaleout's."""

    input: Any = MISSING
    output: str = MISSING
    # Exact-duplicate pass before MinHash: documents with the same words (the text as clean
    # normalises whitespace, or re-wrapped) are removed, all but the first in input order,
    # before the buckets step (docs/data-dedup.md, "Exact duplicates", says why it is on).
    exact: bool = True
    threshold: float = 0.95  # a pair is a near-duplicate when its Jaccard is >= this
    ngram: int = 5  # shingles are word n-grams
    num_perm: int = 128
    seed: int = 1
    scheme: str = "affine32"  # datasketch's permutation scheme: affine32 | legacy
    bands: int = 0  # 0: choose bands x rows from candidate_jaccard/candidate_recall
    rows: int = 0
    candidate_jaccard: float = 0.0  # 0: threshold - 0.05
    candidate_recall: float = 0.9999  # wanted P(candidate) at candidate_jaccard
    verify: str = "exact"  # exact: shingle-set Jaccard; signature: MinHash estimate
    prefilter_margin: float = 0.1  # skip exact check when estimate < threshold - margin
    bucket_window: int = 16  # pair each bucket member with the next `window` members
    # Buckets tasks per group of bands, each over one range of band-key values, so a task
    # holds about 1/key_ranges of the keys; 0: one range per 32 GiB of input.
    key_ranges: int = 0
    batch_bytes: int = 1 << 20  # input bytes per block of a signature task
    backend: str = "auto"  # signature backend: auto | simd | openssl | numpy
    spool: str = "plain"  # the parsed documents kept for the write pass: plain | zstd
    work_dir: str = ""  # parent of opt-train-dedup.work/; unset: <output>.dedup-work
    keep_work: bool = False
    examples: int = 5  # example pairs in the report

    def __post_init__(self) -> None:
        super().__post_init__()
        check_limits(self, "", DEDUP_LIMITS)


# Allowed values (data_pipeline.config_limits); 0 means "chosen" where the comments say so.
DEDUP_LIMITS = {
    "threshold": Range(0, 1, lo_open=True),
    "ngram": AT_LEAST_1,
    "num_perm": AT_LEAST_1,
    "seed": NON_NEGATIVE,
    "scheme": OneOf(SCHEMES),
    "bands": NON_NEGATIVE,
    "rows": NON_NEGATIVE,
    "candidate_jaccard": Range(0, 1, hi_open=True),
    "candidate_recall": Range(0, 1, lo_open=True, hi_open=True),
    "verify": OneOf(("exact", "signature")),
    "prefilter_margin": Range(0, 1),
    "bucket_window": AT_LEAST_1,
    "key_ranges": NON_NEGATIVE,
    "batch_bytes": AT_LEAST_1,
    "backend": OneOf(("auto", *BACKENDS)),
    "spool": OneOf(("plain", "zstd")),
    "examples": NON_NEGATIVE,
}


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(a pair with this Jaccard shares at least one band) = 1 - (1 - J^rows)^bands."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def choose_banding(
    num_perm: int, candidate_jaccard: float, candidate_recall: float
) -> tuple[int, int]:
    """The most selective bands x rows (largest rows, bands = num_perm // rows) that still
    makes a pair at `candidate_jaccard` a candidate with probability >= candidate_recall.
    More rows means fewer false candidates to verify; the recall floor is what matters."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if candidate_probability(candidate_jaccard, bands, rows) >= candidate_recall:
            best = (bands, rows)
    return best
