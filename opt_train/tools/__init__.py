"""Command-line tools over configs and run directories: the memory planner (`plan`), HF export
(`hf_export`), plots (`plot`), a step's documents (`provenance`) and downstream evaluation
(`evaluate`). `python -m opt_train.plan`, `.hf`, `.plot`, `.provenance` and `.eval` reach them.

Imports: anything in opt_train; nothing imports tools.
"""
