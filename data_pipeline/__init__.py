"""Data pipeline: raw corpora and Reddit dumps -> cleaned, deduplicated, tokenized shards.

`stages/` holds the stages (`python -m data_pipeline.<stage>` runs one; `python -m
data_pipeline` runs the configured chain, `chain`), `runtime/` what splits a stage into tasks
on datatrove's executors, `kernels/` the compiled inner loops. The top-level modules are what
stages share and what opt_train may import: documents (JSONL records and rejects), files and
ownership (durable writes; what may be replaced), shards and tokenizer (the token-shard
contract), sources, config_limits and the tiny corpus. Nothing here imports opt_train.
"""
