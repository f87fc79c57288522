"""What runs a stage: CLI helpers (`cli`), progress lines (`progress`), the scale-out keys,
shares, task steps and report roll-up (`scaleout`), the stage-plan base (`plan`), and the
local, Slurm and Ray executors with their process hygiene (`executors`).

Imports: data_pipeline's top-level modules (documents, files, ownership, config_limits); inside,
executors and plan build on scaleout, which builds on cli and progress.
"""
