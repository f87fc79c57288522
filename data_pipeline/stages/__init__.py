"""The pipeline stages, one job each, runnable alone (`python -m data_pipeline.<stage>`) and in
the chain: reddit (with its thread rule in reddit_threads), ingest (the chain's per-source
read), clean, dedup, by_source (the chain's per-source sets after a joint dedup), tokenize,
merge.

Imports: `data_pipeline.runtime`, `data_pipeline.kernels` and the top-level modules.
"""
