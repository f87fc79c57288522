"""The training loop (`trainer`), the run lock, signals, FLOPs/MFU and the run's metric files;
`callbacks/` holds the side concerns the loop calls.

Imports: everything in opt_train below it (model, parallel, checkpoint, engine, data, config).
"""
