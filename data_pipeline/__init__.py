"""Data pipeline: raw corpora and Reddit dumps -> cleaned, deduplicated, tokenized shards.

Each stage lives in its own module and runs alone (`python -m data_pipeline.<stage>`);
`python -m data_pipeline` runs the configured chain.
"""
