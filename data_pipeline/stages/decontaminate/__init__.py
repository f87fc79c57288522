"""N-gram decontamination: corpus documents that share word n-grams with evaluation texts
(lm-eval tasks or JSONL files) are counted per task and per source, and kept, removed or
masked.

    python -m data_pipeline.decontaminate input=<corpus> output=<out> eval=<eval.jsonl> \
        'eval_tasks=[lambada_openai]' include_path=<task yamls> action=remove

GPT-3 (Brown et al. 2020, appendix C) removed from its training data the documents that
shared a 13-gram with a benchmark; lm-eval's decontamination, datatrove, NeMo Curator and
dolma offer the same check. Here:

1. the driver builds the index (`eval_index`): every evaluation text's word n-grams
   (`ngrams`: the word rule and the 64-bit hashes) for every task, sorted, 12 bytes per
   n-gram, written into the work directory; bad evaluation input stops the run before any
   work, naming the file and line or the task;
2. `scan` (one task per contiguous share of the input files) streams its documents against
   the memory-mapped index (every task process shares it), applies `action` and counts per
   task and per source (`meta.source`);
3. `report` (one task) sums every task's counts, joins the matches and rejects files in
   input order and publishes the parts as the output.

A document's result depends on it alone, and the parts are in input order, so the output is
the same bytes for any `tasks`, `workers` and executor. docs/data-decontamination.md.
"""

from data_pipeline.stages.decontaminate.config import DecontaminateConfig
from data_pipeline.stages.decontaminate.stage import main, run

__all__ = ["DecontaminateConfig", "main", "run"]
