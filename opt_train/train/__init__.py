"""The training loop (`trainer`), the run lock, signals, FLOPs/MFU, the run's files and the
shape of its metric rows (`metric_rows`), the goodput ledger (`goodput`); `callbacks/` holds the side concerns the loop calls.

Imports: everything in opt_train below it (model, parallel, checkpoint, engine, data, config).
Inside: `trainer` above `callbacks` above the other modules, which import none of the two.
"""
