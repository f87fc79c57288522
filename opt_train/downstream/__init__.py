"""Downstream evaluation through lm-evaluation-harness: OPT's zero-shot suite and its scorecard."""
