"""The OPT model as a plain `nn.Module` (no parallelism: `opt_train.parallel` applies it),
its dropout, Hugging Face conversion and `model.init_from`.

Imports: `opt_train.config` only.
"""
