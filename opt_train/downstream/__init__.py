"""Downstream evaluation through lm-evaluation-harness (docs/evaluation.md).

`harness` is the lm-eval model over our own model (`OptLM`: log-likelihoods in batches,
sharded over data-parallel ranks); `run` loads tasks (lm-eval's own and YAMLs from an
include path), checks them before any model work and evaluates. Both import `lm_eval`, which
only `downstream.tasks` turned on (or `python -m opt_train.eval`) loads: nothing here is
imported by this package's `__init__`.

Imports: engine (autocast), checkpoint, data (the run's tokenizer record), parallel, model,
config; never train or above (the loop's callback and the CLI call into here).
"""
