"""What every task of one run agrees on (inputs, shares, banding, the work directory's
layout), and what each step's files depend on (their fingerprints)."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.config_limits import check_limits
from data_pipeline.documents import InputLimits
from data_pipeline.runtime import scaleout
from data_pipeline.runtime.plan import StagePlan
from data_pipeline.stages.dedup.config import DEDUP_LIMITS, DedupConfig, choose_banding

_BYTES_PER_KEY_RANGE = 32 << 30  # key_ranges=0: one buckets range per 32 GiB of input
STEPS = ("signatures", "exact", "buckets", "clusters", "filter", "report")


class DedupPlan(StagePlan):
    """The run's input files and shares (StagePlan), with the banding, the buckets tasks'
    split and the MinHash parameters every task uses."""

    stage = "dedup"
    work_beside = "{name}.dedup-work"  # the name earlier runs used: a rerun finds their work
    parts_dir = "filter"  # the filter step's parts, published as the output by the report step

    def __init__(self, cfg: DedupConfig):
        # Again here: a config built in Python may have been changed after construction.
        check_limits(cfg, "", DEDUP_LIMITS)
        super().__init__(cfg)
        sizes = self.share_files()
        cand_j = cfg.candidate_jaccard or max(cfg.threshold - 0.05, 0.01)
        if cfg.bands and cfg.rows:
            self.bands, self.rows = cfg.bands, cfg.rows
        else:
            self.bands, self.rows = choose_banding(cfg.num_perm, cand_j, cfg.candidate_recall)
        if self.bands * self.rows > cfg.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} > num_perm = {cfg.num_perm}")
        self.band_tasks = min(self.tasks, self.bands)
        self.band_shares = scaleout.even_shares(self.bands, self.band_tasks)
        self.key_ranges = cfg.key_ranges or max(1, -(-sum(sizes) // _BYTES_PER_KEY_RANGE))
        self.bucket_tasks = self.band_tasks * self.key_ranges
        self.hasher_params = dict(
            num_perm=cfg.num_perm,
            seed=cfg.seed,
            ngram=cfg.ngram,
            scheme=cfg.scheme,
            backend=cfg.backend,
        )

    def step_counts(self) -> dict[str, int]:
        exact = self.key_ranges if self.cfg.exact else 0  # 0: the step does not run
        counts = (self.tasks, exact, self.bucket_tasks, 1, self.tasks, 1)
        return dict(zip(STEPS, counts, strict=True))

    def fingerprints(self) -> list[tuple[str, dict]]:
        """Each step's files depend on its own entry and every earlier one."""
        cfg = self.cfg
        params = {k: v for k, v in self.hasher_params.items() if k != "backend"}
        return [
            (
                "signatures",
                {
                    "inputs": self.files_fingerprint(),
                    "tasks": self.tasks,
                    "spool": cfg.spool,
                    "limits": InputLimits.of(cfg).fingerprint(),
                    "exact_keys": "xxh3-128 of the words joined by single spaces",
                    **params,
                },
            ),
            ("exact", {"exact": cfg.exact, "key_ranges": self.key_ranges}),
            (
                "buckets",
                {
                    "banding": [self.bands, self.rows],
                    "window": cfg.bucket_window,
                    "key_ranges": self.key_ranges,
                },
            ),
            (
                "clusters",
                {
                    "threshold": cfg.threshold,
                    "verify": cfg.verify,
                    "prefilter_margin": cfg.prefilter_margin,
                    "examples": cfg.examples,
                },
            ),
            ("filter", {"output": str(self.out.resolve())}),
            ("report", {}),
        ]

    def sig_dir(self, rank: int) -> Path:
        return self.work / "signatures" / f"task-{rank:05d}"
