"""Sharded checkpoints: layout and checksums, DCP reads that run no code from a file, the
manager that saves, keeps and finds them, and the resume guard.

Imports: `opt_train.parallel`, `opt_train.model`, `opt_train.config`, data_pipeline's file
operations.
"""
