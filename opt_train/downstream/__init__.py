"""Downstream evaluation through lm-evaluation-harness (docs/evaluation.md), OPT's zero-shot
suite and its scorecard (docs/opt-zero-shot.md).

`harness` is the lm-eval model over our own model (`OptLM`: log-likelihoods in batches,
sharded over data-parallel ranks); `run` loads tasks (lm-eval's own and YAMLs from an
include path), checks them before any model work and evaluates. Both import `lm_eval`, which
only `downstream.tasks` turned on (or `python -m opt_train.eval`) loads: nothing here is
imported by this package's `__init__`. `tasks/` holds the `opt_zero_shot` group YAML;
`reference` reads the released checkpoints' published scores (opt_reference.json).

Imports: engine (autocast), checkpoint, data (the run's tokenizer record), parallel, model,
config; never train or above (the loop's callback and the CLI call into here).
"""
