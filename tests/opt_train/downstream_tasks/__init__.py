"""Task YAMLs over local JSONL for the downstream tests, and the tiny run they score.

Three tasks, one per kind of lm-eval request our model serves: `tiny_mc` (multiple choice:
loglikelihood of each choice, acc and acc_norm), `tiny_next` (loglikelihood with greedy
match: acc, perplexity) and `tiny_ppl` (loglikelihood_rolling: word and byte perplexity,
bits per byte), written as YAML + JSONL into a directory given as `include_path`. The
questions are about the embedded tiny corpus's facts (data_pipeline/tiny_corpus.py), which a
few training steps start to learn. Some texts are longer than the run's 64 positions, so
truncation and several rolling windows are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.tiny_corpus import tiny_documents

NAMES = ["tiny_mc", "tiny_next", "tiny_ppl"]
MAX_POSITIONS = 64  # the run's model.max_positions (and data.seq_len)

MC = [
    ("Two plus three is", [" five", " six", " seven", " one"], 0),
    ("After Monday comes", [" Sunday", " Tuesday", " March", " five"], 1),
    ("The cat says", [" moo", " woof", " meow", " quack"], 2),
    ("Four, five, six,", [" seven", " eight", " two", " Monday"], 0),
    ("March comes after", [" April", " January", " February", " Friday"], 2),
    ("The duck says", [" quack", " meow", " cluck", " yip"], 0),
    # a shared context and choices that extend one another: one forward serves several
    ("Anna has a red ball. Anna gives the red ball to", [" Tom", " Tom and Mia", " Mia"], 0),
    # longer than the model: lm-eval cuts the context on the left
    (" ".join(["One, two, three, four, five."] * 8) + " Six, seven,", [" eight", " ten"], 0),
]
NEXT = [
    ("Seven times six is", " forty-two"),
    ("After Friday comes", " Saturday"),
    ("The dog says", " woof"),
    ("Ten minus five is", " five"),
    ("Twelve, thirteen, fourteen,", " fifteen"),
]


def write_tasks(out: Path) -> Path:
    """The three tasks' JSONL and YAML files in `out` (absolute data paths); returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    docs = {
        "tiny_mc": [{"q": q, "choices": c, "label": a} for q, c, a in MC],
        "tiny_next": [{"context": c, "word": w} for c, w in NEXT],
        "tiny_ppl": [
            {"text": d["text"][: 150 + 120 * i]} for i, d in enumerate(tiny_documents(7, 4))
        ],
    }
    for name, rows in docs.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    data = "dataset_kwargs:\n  data_files:\n    test: {path}\n"
    (out / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        + common
        + data.format(path=out / "tiny_mc.jsonl")
        + "output_type: multiple_choice\n"
        + 'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (out / "tiny_next.yaml").write_text(
        "task: tiny_next\n"
        + common
        + data.format(path=out / "tiny_next.jsonl")
        + "output_type: loglikelihood\n"
        + 'doc_to_text: "{{context}}"\ndoc_to_target: "{{word}}"\n'
        + "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    (out / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n"
        + common
        + data.format(path=out / "tiny_ppl.jsonl")
        + "output_type: loglikelihood_rolling\n"
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        + "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        + "  - metric: bits_per_byte\n"
    )
    return out


def write_gpt2_shards(out: Path, num_docs: int = 300) -> Path:
    """Token shards of the tiny corpus's documents with GPT-2 ids (what the embedded default
    trains on), written directly: the full chain takes a minute and is tested elsewhere."""
    from data_pipeline.shards import ShardWriter
    from data_pipeline.tokenizer import Tokenizer, TokenizerSpec

    tok = Tokenizer(TokenizerSpec("gpt2"))
    with ShardWriter(out, tok.describe()) as w:
        for i, d in enumerate(tiny_documents(0, num_docs)):
            w.add(tok.encode(d["text"]), "validation" if i % 10 == 0 else "train")
    return out


def run_overrides(run_dir: Path, data: Path, tasks: Path, *extra: str) -> list[str]:
    """A 2-layer, 32-wide OPT with GPT-2's vocabulary and 64 positions, fp32 without dropout,
    evaluating the three tasks at its final step."""
    return [
        f"run_dir={run_dir}",
        f"data.path={data}",
        "model.d_model=32",
        "model.n_heads=4",
        f"model.max_positions={MAX_POSITIONS}",
        "model.dropout=0.0",
        "model.attention_dropout=0.0",
        f"data.seq_len={MAX_POSITIONS}",
        "train.micro_batch_size=8",
        "train.batch_tokens=512",
        "train.eval_interval=0",
        "precision=fp32",
        "optim.lr=0.01",
        "optim.warmup_tokens=1024",
        "optim.decay_tokens=20480",
        "logging.wandb=disabled",
        "logging.progress=false",
        "logging.peak_tflops=1.0",
        f"downstream.tasks=[{','.join(NAMES)}]",
        f"downstream.include_path={tasks}",
        "downstream.batch_size=4",
        *extra,
    ]
