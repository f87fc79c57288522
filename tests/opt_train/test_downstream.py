"""Downstream evaluation through lm-evaluation-harness: our lm-eval model against lm-eval's own
`hf` model on the run's HF export, at 1 rank, 2 ranks and tp=2; the in-loop row against the
offline command; a run with in-loop evaluation killed and resumed against the same run
uninterrupted and against the run without evaluation.

One run serves them all (`eval_run`; tests/conftest.py sends its tests to one xdist worker,
so it is built once): `python train.py` in a subprocess (as users run it, and as the killed
run below is run), 12 steps of a 2-layer OPT with GPT-2's vocabulary and dropout
0.1 (so a disturbed RNG would show in the losses), evaluating the three local tasks of
tests/opt_train/downstream_tasks every 4 steps, saving every 4.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from tests.multirank import REPO, free_port, rank_env, spawn
from tests.opt_train.conftest import train_on_ranks
from tests.opt_train.downstream_tasks import NAMES, run_overrides, write_gpt2_shards, write_tasks
from tests.processes import kill_tree, run, started

STEPS = 12
RUN = [
    f"train.max_steps={STEPS}",
    "model.dropout=0.1",
    "model.attention_dropout=0.1",
    "downstream.interval=4",
    "checkpoint.interval=4",
    "checkpoint.keep=5",
]
# fp32 scores of the same weights computed in another order (batch shapes, padding, TP's
# split log-sum-exp over 50,272 logits): the sums of a few dozen log-probabilities of about
# -10 agree to ~1e-7 relative (seen: 2e-7 at most); 1e-5 leaves room and still fails any
# difference in tokens, positions or weights, which move a score by more than 1e-3.
REL = 1e-5


def train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "train.py", *overrides]


def env() -> dict[str, str]:
    # two threads, as in-process tests run (tests/conftest.py): the same reductions
    return rank_env(threads=2)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def downstream_rows(run_dir: Path) -> dict[int, dict]:
    """step -> the downstream row without its timing (a row logged again keeps its last)."""
    out = {}
    for r in rows(run_dir):
        if "downstream_time_s" in r:
            out[r["step"]] = {k: v for k, v in r.items() if k != "downstream_time_s"}
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> types.SimpleNamespace:
    d = tmp_path_factory.mktemp("downstream")
    tasks = write_tasks(d / "tasks")
    data = write_gpt2_shards(d / "shards")
    overrides = run_overrides(d / "run", data, tasks, *RUN)
    out = run(train_cmd(overrides), 600, cwd=REPO, env=env())
    assert out.returncode == 0, out.stderr[-4000:]
    return types.SimpleNamespace(dir=d, run=d / "run", tasks=tasks, data=data)


def eval_args(eval_run, out: Path, *extra: str) -> list[str]:
    """`opt_train.eval`'s arguments for the run's newest checkpoint, results to `out`."""
    return [
        str(eval_run.run),
        f"tasks=[{','.join(NAMES)}]",
        f"include_path={eval_run.tasks}",
        f"output={out}",
        "log_samples=true",
        "bootstrap_iters=0",
        *extra,
    ]


def offline(eval_run, out: Path, *extra: str) -> dict:
    """`python -m opt_train.eval` in this process on the run's newest checkpoint."""
    from opt_train.tools.evaluate import main

    main(eval_args(eval_run, out, *extra))
    return json.loads(out.read_text())


def lm_eval_hf_model(export: Path):
    """lm-eval's own `hf` model (HFLM, which needs `accelerate`: lm-eval's `hf` extra, in our
    `dev`) over the export, as `lm_eval --model hf --model_args pretrained=PATH,dtype=float32`
    builds it."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(export), dtype="float32", device="cpu", batch_size=3)


def assert_same_scores(ours: dict, ref: dict, rel: float = REL) -> None:
    """Every document's scores (log-likelihood and greedy flag of each request) and every
    accuracy equal; perplexities within the scores' tolerance."""
    for task in NAMES:
        a, b = ours["samples"][task], ref["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for sa, sb in zip(a, b, strict=True):
            for ra, rb in zip(sa["filtered_resps"], sb["filtered_resps"], strict=True):
                ra, rb = (ra, rb) if isinstance(ra, (list, tuple)) else ([ra], [rb])
                assert ra[0] == pytest.approx(rb[0], rel=rel), (task, sa["doc_id"])
                assert list(ra[1:]) == list(rb[1:]), (task, sa["doc_id"])  # greedy
        for key, value in ref["results"][task].items():
            if key.startswith(("acc,", "acc_norm,")):
                assert ours["results"][task][key] == value, (task, key)
            elif "," in key and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=100 * rel)


@pytest.mark.slow
def test_offline_scores_equal_lm_eval_hf_model_on_the_export_and_the_in_loop_row(
    eval_run, tmp_path
):
    """Our lm-eval model on the sharded checkpoint gives lm-eval's `hf` model's per-document
    log-likelihoods (within fp32 reduction order), greedy flags and acc/acc_norm on the run
    exported with opt_train.hf; and the row the loop wrote at its final step is that result."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from opt_train.downstream.run import metric_rows
    from opt_train.tools.hf_export import export_checkpoint

    ours = offline(eval_run, tmp_path / "ours.json", "batch_size=5")
    assert ours["config"]["opt_train"]["step"] == STEPS

    export = tmp_path / "hf"
    report = export_checkpoint(eval_run.run, export)
    assert report["tokenizer"] == "gpt2" and "tokenizer.json" in report["files"]
    ref = lm_eval.simple_evaluate(
        model=lm_eval_hf_model(export),
        tasks=NAMES,
        task_manager=TaskManager(include_path=str(eval_run.tasks), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    assert_same_scores(ours, ref)
    # the test is not vacuous: the tasks' scores move with the weights, and some are greedy
    assert (
        any(s["filtered_resps"][0][1] for s in ref["samples"]["tiny_next"])
        or any(r[1] for s in ref["samples"]["tiny_mc"] for r in s["filtered_resps"])
        or ours["results"]["tiny_mc"]["acc,none"] > 0
    )

    # the loop's row at the final step: the same code on the same weights, so the same values
    in_loop = downstream_rows(eval_run.run)[STEPS]
    expected = {"step": STEPS, **metric_rows(ours)}
    assert in_loop.keys() == expected.keys()
    assert {k: pytest.approx(v, rel=1e-6) for k, v in expected.items()} == in_loop


def _evaluate_on_rank(rank: int, world: int, args: list[str]) -> None:
    from opt_train.tools.evaluate import main

    main(args)


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_under_torchrun_and_tp2_equal_one_rank(eval_run, tmp_path):
    """`torchrun -m opt_train.eval` with 2 data-parallel ranks (each scores half the batches
    from its FSDP2 shard of the checkpoint), and the same command's `main` with tp=2 on two
    forked ranks (the vocabulary split, log-softmax all-reduced; the launch is the dp2 run's):
    the same scores and accuracies as one process."""
    one = offline(eval_run, tmp_path / "one.json")
    dp2, tp2 = tmp_path / "dp2.json", tmp_path / "tp2.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "opt_train.eval",
        *eval_args(eval_run, dp2),
    ]
    r = run(cmd, 600, cwd=REPO, env=rank_env())
    assert r.returncode == 0, r.stderr[-4000:]
    spawn(_evaluate_on_rank, 2, eval_args(eval_run, tp2, "tp=2"), join_group=False)
    for out, tp in ((dp2, 1), (tp2, 2)):
        got = json.loads(out.read_text())
        assert (got["config"]["world"], got["config"]["tp"]) == (2, tp)
        assert_same_scores(got, one)
    # dp2: the same batches, the same shards gathered: bit for bit
    assert json.loads(dp2.read_text())["results"] == one["results"]


@pytest.mark.slow
def test_sigkill_with_in_loop_evaluation_resumes_exactly_and_evaluation_leaves_the_losses(
    eval_run, tmp_path
):
    """A run with in-loop evaluation SIGKILLed after its step-8 evaluation and checkpoint,
    then the same command: every loss and every downstream row equal the uninterrupted run's,
    which in turn has the losses of the same run without evaluation (dropout on: a consumed or
    reseeded RNG would change them)."""
    run_dir = tmp_path / "run"
    # The last save (step 12) waits for the test (`checkpoint.debug_gate`), so the run cannot
    # finish between its step-8 checkpoint and the kill, however late this process sees it.
    gate = tmp_path / "gate"
    gate.mkdir()
    for step in (4, 8):
        (gate / f"step_{step:08d}").touch()
    gated = [*RUN, f"checkpoint.debug_gate={gate}"]
    overrides = run_overrides(run_dir, eval_run.data, eval_run.tasks, *gated)
    ckpt = run_dir / "checkpoints" / "step_00000008" / "meta.json"
    with (
        open(tmp_path / "kill.log", "w") as log,
        started(
            train_cmd(overrides), cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT
        ) as proc,
    ):
        while not (ckpt.is_file() and 8 in downstream_rows(run_dir)):
            assert proc.poll() is None, (tmp_path / "kill.log").read_text()[-3000:]
            time.sleep(0.05)
        kill_tree(proc.pid)
        proc.wait()
    last = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert not last.exists(), "the kill came after the run had finished"
    (gate / last.name).touch()
    r = run(train_cmd(overrides), 600, cwd=REPO, env=env())
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stderr
    assert losses(run_dir) == losses(eval_run.run)
    assert downstream_rows(run_dir) == downstream_rows(eval_run.run)
    assert sorted(downstream_rows(run_dir)) == [4, 8, 12]

    # The run without evaluation, in this process (two threads, as `env()` gives the commands).
    without = tmp_path / "without"
    plain = [*run_overrides(without, eval_run.data, eval_run.tasks, *RUN), "downstream.tasks=[]"]
    train_on_ranks(1, plain)
    assert not downstream_rows(without)
    assert losses(without) == losses(eval_run.run)


@pytest.mark.slow
def test_bad_tasks_are_refused_by_name_before_any_model_work(tmp_path, small_shards):
    """An unknown name (with the close match), a YAML that does not parse, data that does not
    load and a generative task each stop with an error naming them: offline before the
    checkpoint is read, in the loop before the first step."""
    from opt_train.downstream.run import TaskError, load_tasks
    from opt_train.train.trainer import Trainer
    from tests.opt_train.conftest import small_job

    tasks = write_tasks(tmp_path / "tasks")
    (tasks / "broken.yaml").write_text("task: broken\n  output_type: [\n")
    mc = (tasks / "tiny_mc.yaml").read_text()
    (tasks / "gone.yaml").write_text(
        mc.replace("task: tiny_mc", "task: gone").replace("tiny_mc.jsonl", "missing.jsonl")
    )
    (tasks / "gen.yaml").write_text(
        mc.replace("task: tiny_mc", "task: gen").replace("multiple_choice", "generate_until")
    )
    with pytest.raises(TaskError) as e:
        load_tasks(["tiny_mcc"], str(tasks))
    assert "unknown task 'tiny_mcc'" in str(e.value) and "'tiny_mc'" in str(e.value)
    assert f"{tasks / 'broken.yaml'}" in str(e.value)
    with pytest.raises(TaskError, match=r"tasks \['gone'\]: could not be built"):
        load_tasks(["gone"], str(tasks))
    with pytest.raises(TaskError, match="task 'gen' generates text"):
        load_tasks(["gen"], str(tasks))

    run_dir = tmp_path / "run"
    cfg = small_job(
        run_dir, small_shards, "downstream.tasks=[tiny_mcc]", f"downstream.include_path={tasks}"
    )
    trainer = Trainer(cfg)
    try:
        with pytest.raises(SystemExit, match="error: downstream.tasks: unknown task 'tiny_mcc'"):
            trainer.fit()
    finally:
        trainer.close()
    assert not (run_dir / "metrics.jsonl").exists() or not losses(run_dir)


@pytest.mark.slow
def test_the_training_path_does_not_import_lm_eval_unless_downstream_is_on():
    """lm-eval (and its ~15,000-task index) costs seconds at import: a run without
    downstream.tasks never loads it."""
    code = (
        "import sys\n"
        "from opt_train.config import JobConfig\n"
        "from opt_train.train.callbacks.defaults import default_callbacks\n"
        "import opt_train.train.trainer, opt_train.tools.hf_export\n"
        "default_callbacks(JobConfig())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lm_eval'))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]"
