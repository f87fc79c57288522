"""Command-line tools over configs and run directories: the memory planner (`plan`), HF export
(`hf_export`) and plots (`plot`). `python -m opt_train.plan`, `.hf` and `.plot` reach them.

Imports: anything in opt_train; nothing imports tools.
"""
