"""What the trainer reads: the token-window loader over shard directories, train-time
mixing of sources, and the documents behind a step (`provenance`, computed from the order).

Imports: `opt_train.config`, data_pipeline's shard and tokenizer contract and tiny corpus.
"""
