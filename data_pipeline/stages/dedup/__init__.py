"""Near-duplicate removal across all sources: MinHash-LSH candidates, exact verification,
union-find clusters, one document kept per cluster.

    python -m data_pipeline.dedup input=<file|dir|glob|[list]> output=out.jsonl[.gz|.zst]

OPT deduplicated its corpus with MinHash-LSH at Jaccard >= 0.95. The trap: the bands x rows
that datasketch picks as "optimal" for 0.95 with 128 permutations (3 x 42) make a pair at
J = 0.95 a candidate with probability 1 - (1 - 0.95^42)^3 = 0.31, so most true duplicates are
never even compared. Here banding is chosen for recall instead (default 18 bands x 7 rows:
P(candidate | J = 0.90) > 0.9999), which lets many dissimilar pairs through, and every candidate
pair is then verified on the documents' exact shingle sets before it may join a cluster. See
docs/data-dedup.md for the arithmetic.

Steps, each split into tasks on datatrove's executors (data_pipeline.runtime.executors: local
processes, Slurm job arrays or Ray), each task writing atomically into the work directory beside
the output (`<output>.dedup-work/`, removed after success unless `keep_work=true`) so it restarts
alone; each step is a module of this package (the plan every task shares is `plan`, the keys
`config`, the work directory read back as one corpus `corpus`, the compiled loops
data_pipeline.kernels.lsh):

1. `signatures` (one task per contiguous share of the input files, cut into blocks by
   `blocks`): parse the lines as documents.read_documents does (the common line in compiled
   code, data_pipeline.kernels.jsonl_scan), compute MinHash signatures
   (data_pipeline.kernels.minhash, bit-identical to datasketch), the band keys of the run's
   banding, every document's shingle hashes and its line in output form (the spool, plain
   or zstd), into the task's own directory. Global document numbers are the
   tasks' documents in rank order: the input order.
2. `exact` (one task per range of key values; none with `exact=false`): documents with the
   same words (xxh3-128 of the text as clean normalises whitespace, computed by the signature
   kernel) are removed, all but the first in input order, so they never reach the buckets.
3. `buckets` (one task per group of bands): each band's keys from every signature task;
   documents with equal keys become candidate pairs (keys are made again from the signatures
   if the banding changed on a re-run).
4. `clusters` (one task, over the candidate pairs only): prefilter by estimated Jaccard, verify
   on exact shingle sets, union-find over verified pairs, keep the first document of each
   cluster in global input order; the exact step's removals added.
5. `writeback`, the filter step (one task per signature task): copy its kept documents'
   lines from its spool to its part file; the input is read and parsed once.
6. `report`: every task's statistics and rejects summed, removals by `meta.source`; a file
   output joins the parts.

The output is the same bytes for any tasks, workers and executor. Memory of a signature or
filter task follows its block size; of a buckets task, one band's keys (8 bytes per document);
of the cluster task, the candidate pairs and the documents in them.
"""

from data_pipeline.stages.dedup.config import DedupConfig, candidate_probability, choose_banding

__all__ = ["DedupConfig", "candidate_probability", "choose_banding", "main", "run"]


def __getattr__(name: str):
    """`main` and `run` import the stage, and with it the numba kernels (~0.3 s), on first use:
    the chain checks a complete dedup step against its DedupConfig without running it, at the
    start of every training rank on the embedded tiny corpus."""
    if name in ("main", "run"):
        from data_pipeline.stages.dedup import stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
