"""The stage as a whole: its steps run in order on the configured executor, and its CLI."""

from __future__ import annotations

import time

import numpy as np

from data_pipeline.kernels import lsh
from data_pipeline.kernels.jsonl_scan import parse_block
from data_pipeline.kernels.minhash import MinHasher
from data_pipeline.runtime import executors, scaleout
from data_pipeline.runtime.cli import stage_main, write_report
from data_pipeline.stages.dedup import signatures
from data_pipeline.stages.dedup.buckets import DedupBuckets
from data_pipeline.stages.dedup.clusters import DedupClusters
from data_pipeline.stages.dedup.config import DedupConfig
from data_pipeline.stages.dedup.exact import DedupExact
from data_pipeline.stages.dedup.plan import STEPS, DedupPlan
from data_pipeline.stages.dedup.report import DedupReport
from data_pipeline.stages.dedup.signatures import DedupSignatures
from data_pipeline.stages.dedup.writeback import DedupFilter


def _warm_up(hasher_params: dict, banding: tuple) -> None:
    """Load (on a new machine, compile) every kernel the tasks run, for the very argument
    types they pass (numba keys its compiled code on them),
    in the process that forks the local task processes, so that they inherit them instead of
    each loading them again from numba's cache."""
    signatures.load_hasher(hasher_params)
    line = b'{"text": "warm up the compiled kernels", "id": "0"}\n'
    parsed = parse_block(bytearray(line + bytes(64)), len(line))
    if parsed is not None:  # None: no compiled parser (numba missing)
        _, _, _, text, text_off, _, _ = parsed
        warm_up_hashing(signatures.HASHER, banding, text, text_off[[0, 1]])
    else:
        signatures.HASHER.batch([b"and those of the Python path"])


def warm_up_hashing(hasher: MinHasher, banding: tuple, text: np.ndarray, offsets) -> None:
    """The kernels after parsing, on documents as parse_block gives them (`text`, a writable
    uint8 array with 64 bytes to spare, and their `offsets`): signatures, band keys, shared
    keys, Jaccard, and the Python path's `batch`. Also called by the tests' warm-up for each
    MinHash variant (tests/conftest.py)."""
    sigs = hasher.batch_joined(text, offsets).signatures
    lsh.band_keys(sigs, banding[1], banding[0])
    keys = np.arange(8, dtype=np.uint64)
    lsh.shared_keys(np.concatenate([keys, keys]))
    hashes, offs = np.arange(8, dtype=np.uint32), np.array([0, 4, 8], dtype=np.int64)
    lsh.set_jaccard_kernel(hashes, offs, np.array([0]), np.array([1]), np.empty(1))
    hasher.batch([b"and those of the Python path"])


def run(cfg: DedupConfig) -> dict:
    """signatures -> buckets -> clusters -> filter -> report on the configured executor;
    returns the stage report (with slurm.wait=false, the submitted job ids)."""
    t0 = time.perf_counter()
    scaleout.validate(cfg)
    plan = DedupPlan(cfg)
    MinHasher(**plan.hasher_params)  # validates the parameters before any work
    with scaleout.owned(plan, "dedup"):
        scaleout.prepare(plan, plan.fingerprints())
        counts = plan.step_counts()
        resumed = [
            s for s in STEPS[:4] if counts[s] and scaleout.completed(plan.work, s, counts[s])
        ]
        classes = (DedupSignatures, DedupExact, DedupBuckets, DedupClusters, DedupFilter)
        steps = [(cls(plan), counts[cls.name]) for cls in (*classes, DedupReport)]
        steps = [(step, n) for step, n in steps if n]  # exact=false: no exact step
        if cfg.executor == "local":
            _warm_up(plan.hasher_params, (plan.bands, plan.rows))
        jobs = executors.run_steps(steps, cfg, plan.work)
        report = scaleout.finish("dedup", plan, jobs, t0, "docs_in", "docs_per_s")
    if "slurm_jobs" not in report:
        report["resumed_stages"] = resumed
        write_report(plan.out, report)
    return report


def main() -> None:
    """`python -m data_pipeline.dedup key=value ...`. The executors pickle the steps by
    reference (module path and class name), so every step class lives in a module of this
    package, never in the module run as __main__, whichever one that is."""
    stage_main("dedup", DedupConfig, run)
