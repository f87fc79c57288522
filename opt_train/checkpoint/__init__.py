"""Sharded checkpoints: layout and checksums, DCP reads that run no code from a file, the
manager that saves, keeps and finds them, and the resume guard.

Modules, each importing only those above it in this list: `trusted` (DCP's index read with a
restricted unpickler, `load_dcp`, `CorruptCheckpoint`), `layout` (directory names, formats,
checksums, meta.json's fields, `verify`, `find_checkpoint`), `weights` (`Weights`, `DCPWeights`,
RNG states), `manager` (`CheckpointManager`, failed saves), `resume_guard`.

Imports: `opt_train.parallel`, `opt_train.model`, `opt_train.config`, data_pipeline's file
operations; never `opt_train.train` (the trainer says whether it holds the run lock).
"""
