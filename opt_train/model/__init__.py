"""The OPT model as a plain `nn.Module` (no parallelism: `opt_train.parallel` applies it) with
its parameter shapes and count, its dropout, the precision names' dtypes, Hugging Face
conversion and `model.init_from`.

Imports: `opt_train.config` only.
"""
