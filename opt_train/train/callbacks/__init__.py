"""Side concerns the loop calls at fixed points, one callback per module: evaluation,
downstream (lm-eval tasks), checkpointing, metrics_file, wandb, tensorboard, console,
profiling, stability (spike recovery), mixture (tokens per source), goodput (the goodput
ledger's rows) and observe (timing rows, stragglers, hangs). `base.Callback` holds the hooks;
`defaults.default_callbacks` lists the built-in ones in the order they run.

Imports: `base`, the modules of `opt_train.train` below the callbacks (run_files, metric_rows,
flops, signals) and the layers below `opt_train.train`; never another callback (a callback that
must reach others goes through a hook, as Stability's rollback does with `on_rewind`) and the
`Trainer` only for type checking. `defaults` alone imports the callback modules.
"""
