"""Training engines behind one interface (`base.TrainEngine`): FSDP2 / one process and DeepSpeed
ZeRO, with the loss, the optimizer and precision they share; `factory.build_engine` picks one.

Imports: `opt_train.checkpoint`, `opt_train.parallel`, `opt_train.model`, `opt_train.config`.
"""
