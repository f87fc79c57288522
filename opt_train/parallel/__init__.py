"""Parallelism applied to the plain model: mesh dimensions, the TP plan, FSDP2, activation
checkpointing and torch.compile (`apply`), and process-group helpers, rank agreement
included (`process_groups.agree`).

Imports: `opt_train.model`, `opt_train.config`.
"""
