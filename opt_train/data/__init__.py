"""What the trainer reads: the token-window loader over shard directories and train-time
mixing of sources.

Imports: `opt_train.config`, data_pipeline's shard and tokenizer contract and tiny corpus.
"""
