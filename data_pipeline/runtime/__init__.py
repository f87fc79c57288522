"""What runs a stage: CLI helpers, progress lines, and `scaleout` (splitting a stage into tasks
on datatrove's local, Slurm or Ray executors and rolling their reports up).

Imports: data_pipeline's top-level modules (documents, files, ownership, config_limits).
"""
