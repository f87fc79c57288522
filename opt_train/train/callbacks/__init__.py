"""Side concerns the loop calls at fixed points (`base.Callback`): evaluation,
checkpointing, metric files, wandb, TensorBoard, the console, profiling and spike recovery.

Imports: `base` and the layers below `opt_train.train`; the `Trainer` only for type checking.
"""
