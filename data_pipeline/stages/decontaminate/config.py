"""The stage's keys (DecontaminateConfig) and their allowed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from data_pipeline.config_limits import AT_LEAST_1, NON_NEGATIVE, OneOf, check_limits
from data_pipeline.runtime import scaleout

ACTIONS = ("report", "remove", "mask")


@dataclass
class DecontaminateConfig(scaleout.ScaleOut):
    """Keys of `python -m data_pipeline.decontaminate` (docs/data-decontamination.md explains
    each); the scale-out keys (tasks, workers, executor, slurm, ray) are
    data_pipeline.runtime.scaleout's. `tasks` there is the number of shares of the corpus: the
    lm-eval task names are `eval_tasks`."""

    input: Any = MISSING
    output: str = MISSING
    # Evaluation texts: JSONL files (a file, directory, glob or list), one {"text": ...} per
    # line, with the task's name in `eval_task_field` (else the file's name without suffixes).
    eval: Any = None
    eval_task_field: str = "task"
    # lm-evaluation-harness tasks (names, groups or tags), resolved by its TaskManager over
    # `include_path` (a directory of task YAMLs, or a list) and, with include_defaults, the
    # tasks it ships with (indexing those takes seconds).
    eval_tasks: list[str] = field(default_factory=list)
    include_path: Any = None
    include_defaults: bool = True
    # Word n-grams (GPT-3 used 13); a document is contaminated by a task when it holds at
    # least `min_ngrams` distinct n-grams of that task's texts.
    ngram: int = 13
    min_ngrams: int = 1
    # report: every document kept as it is; remove: contaminated documents dropped; mask:
    # the matching spans of contaminated documents replaced by `mask_with`.
    action: str = "report"
    mask_with: str = ""
    # mask: characters also cut each side of a span, text left between cuts shorter than
    # mask_min_piece cut too, documents with more than mask_max_hits matching n-gram positions
    # removed whole (0: no limit). GPT-3's (lm-eval's janitor): 200, 200 and 10.
    mask_window: int = 0
    mask_min_piece: int = 0
    mask_max_hits: int = 0
    examples: int = 5  # matches listed per task in the report
    # The parent of this stage's private opt-train-decontaminate.work/; unset: beside the output.
    work_dir: str | None = None
    keep_work: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_limits(self, "", DECONTAMINATE_LIMITS)
        if self.eval is None and not self.eval_tasks:
            raise ValueError("nothing to decontaminate against: set eval= and/or eval_tasks=[...]")


DECONTAMINATE_LIMITS = {
    "ngram": AT_LEAST_1,
    "min_ngrams": AT_LEAST_1,
    "action": OneOf(ACTIONS),
    "examples": NON_NEGATIVE,
    "mask_window": NON_NEGATIVE,
    "mask_min_piece": NON_NEGATIVE,
    "mask_max_hits": NON_NEGATIVE,
}
