"""opt-train: a PyTorch-native reproduction of Meta's OPT pretraining.

Subpackages, each importing only those above it in this list: `model` (the plain OPT module),
`parallel` (TP, FSDP2, AC, compile applied to it), `checkpoint`, `engine` (FSDP2 or DeepSpeed
behind one interface), `data` (the loader and mixing), `downstream` (lm-eval tasks over the
model), `train` (the loop, its callbacks), `tools` (plan, export, plot, evaluate). `config`
(typed Hydra schemas) and `overrides` (the command line checked against them) sit below all
of them; `launch` (train.py's entry) sits above
`train` and below `tools` (the planner builds its typed config through it); `data` and
`engine` never import each other. Layers are checked by import-linter (pyproject.toml,
docs/architecture.md).
"""
