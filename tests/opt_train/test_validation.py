"""Data safety at start-up and in the loop: bad config values, out-of-vocabulary token ids,
changed shard bytes and Ctrl-C, each through the real `python train.py` (or torchrun) a user
runs."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from opt_train.data.loader import GlobalOrderLoader, PackedWindows
from tests.multirank import rank_env, torchrun_train
from tests.opt_train.conftest import REPO, make_config, small_job_overrides


def train_py(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The values the issue found accepted, or refused only with a traceback or after start-up.
CLI_CASES = [
    ("train.max_steps=-1", "train.max_steps must be >= 1, got -1"),
    ("optim.lr=-3e-3", "optim.lr must be > 0, got -0.003"),
    ("optim.lr=nan", "optim.lr must be > 0, got nan"),
    ("train.seed=-1", "train.seed must be in [0, 9223372036854775807], got -1"),
    ("train.batch_tokens=0", "train.batch_tokens must be >= 1, got 0"),
    ("train.eval_batches=0", "train.eval_batches must be >= 1, got 0"),
    ("logging.peak_tflops=0", "logging.peak_tflops must be > 0 or null (derived), got 0.0"),
    ("data.seq_len=4096", "data.seq_len=4096 is more than model.max_positions=2048"),
]


@pytest.mark.parametrize(("override", "message"), CLI_CASES)
def test_bad_value_stops_train_py_before_any_step_naming_key_and_range(tmp_path, override, message):
    run_dir = tmp_path / "run"
    r = train_py(f"run_dir={run_dir}", "logging.wandb=disabled", override)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: invalid config: {message}"), r.stderr
    assert "Traceback" not in r.stderr
    assert not run_dir.exists()  # nothing built, so no metrics.jsonl, config or checkpoint


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=inf", "optim.lr must be > 0, got inf"),
        ("optim.beta2=1.0", "optim.beta2 must be in [0, 1), got 1.0"),
        ("optim.end_lr_ratio=1.5", "optim.end_lr_ratio must be in [0, 1], got 1.5"),
        ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
        ("model.dropout=1.0", "model.dropout must be in [0, 1), got 1.0"),
        ("model.n_layers=0", "model.n_layers must be >= 1, got 0"),
        ("parallel.dp_shard=0", "parallel.dp_shard must be -1 or >= 1, got 0"),
        ("parallel.timeout_s=0", "parallel.timeout_s must be > 0, got 0.0"),
        ("parallel.compile=yes", "parallel.compile must be auto, on or off, got 'yes'"),
        ("checkpoint.keep=0", "checkpoint.keep must be >= 1, got 0"),
        ("loss_scale.window=0", "loss_scale.window must be >= 1, got 0"),
        ("train.device=tpu", "train.device must be auto, cpu or cuda, got 'tpu'"),
        ("stability.loss_factor=0.5", "stability.loss_factor must be 0 or > 1, got 0.5"),
        ("data.exhaust=never", "data.exhaust must be repeat or stop, got 'never'"),
    ],
)
def test_each_section_refuses_out_of_range_values_naming_the_key(override, message):
    with pytest.raises(Exception) as e:
        make_config(override)
    assert str(e.value.__cause__ or e.value) == message


def test_values_at_the_edges_of_their_ranges_are_accepted():
    cfg = make_config(
        "train.max_steps=1",
        "train.seed=0",
        "optim.end_lr_ratio=1.0",
        "optim.weight_decay=0",
        "model.dropout=0.0",
        "parallel.dp_shard=-1",
        "stability.loss_factor=0",
        "data.seq_len=2048",
        "train.batch_tokens=2048",
    )
    assert cfg.data.seq_len == cfg.model.max_positions == 2048


# -- token ids outside the vocabulary ---------------------------------------------------------


def corrupt_one_token(shards: Path, seq_len: int, window: int, offset: int, value: int):
    """Write `value` over token `offset` of training window `window` in the shard file that
    holds it; returns (shard file name, document index) computed from the manifest and index."""
    manifest = json.loads((shards / "manifest.json").read_text())
    pos = window * seq_len + offset
    for shard in manifest["splits"]["train"]["shards"]:
        if pos < shard["num_tokens"]:
            break
        pos -= shard["num_tokens"]
    index = np.fromfile(shards / shard["index"], dtype=np.int64)
    doc = int(np.searchsorted(index, pos, side="right")) - 1
    tokens = np.memmap(shards / shard["tokens"], dtype=np.uint16, mode="r+")
    tokens[pos] = value
    tokens.flush()
    del tokens
    return shard["tokens"], doc


def window_read_by(shards: Path, rank: int, world: int, step: int) -> int:
    """A window that rank `rank` of `world` trains on at optimizer step `step` (small_job:
    8 sequences of 32 tokens per step, seed 0)."""
    loader = GlobalOrderLoader(PackedWindows(shards, "train", 32), 0, 8, 4 // world, rank, world)
    per_rank = 8 // world
    g = (step - 1) * 8 + rank * per_rank + 1
    return loader.sample_index(g)


@pytest.mark.slow
def test_out_of_vocab_id_stops_one_process_naming_shard_and_document(tmp_path, small_shards):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    name, doc = corrupt_one_token(shards, 32, window_read_by(shards, 0, 1, 2), 7, 40000)
    run_dir = tmp_path / "run"
    r = train_py(*small_job_overrides(run_dir, shards, "train.max_steps=4"))
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 2: 1 token id(s) outside the vocabulary [0, 512)"), last
    assert f"id 40000 at {shards / name}, document {doc} " in last
    assert "Traceback" not in r.stderr and "IndexError" not in r.stderr
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1]  # step 2 never stepped


@pytest.mark.slow
def test_out_of_vocab_id_on_rank_1_stops_both_gloo_ranks_together(tmp_path, small_shards):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    name, doc = corrupt_one_token(shards, 32, window_read_by(shards, 1, 2, 2), 3, 65535)
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    # A rank left waiting in a collective would sit out parallel.timeout_s=120 first.
    r = torchrun_train(
        2,
        small_job_overrides(run_dir, shards, "train.max_steps=4", "parallel.timeout_s=120"),
        timeout=240,
    )
    took = time.monotonic() - t0
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert f"id 65535 at {shards / name}, document {doc} " in out, out[-3000:]
    assert "error: step 2: token ids outside the vocabulary [0, 512) on 1 other rank(s)" in out
    assert "IndexError" not in out and "timed out" not in out.lower()
    assert took < 100, took


def test_out_of_vocab_id_in_the_validation_set_stops_at_start_up(tmp_path, small_shards):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    first = manifest["splits"]["validation"]["shards"][0]
    tokens = np.memmap(shards / first["tokens"], dtype=np.uint16, mode="r+")
    tokens[40] = 9999
    tokens.flush()
    del tokens
    run_dir = tmp_path / "run"
    r = train_py(
        *small_job_overrides(run_dir, shards, "train.max_steps=2", "train.eval_interval=1")
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "token id(s) of the validation set outside the vocabulary [0, 512)" in last
    assert f"id 9999 at {shards / first['tokens']}, document 0 " in last
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_data_verify_refuses_a_shard_whose_bytes_changed(tmp_path, small_shards):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    name, _ = corrupt_one_token(shards, 32, 5, 1, 7)  # still in the vocabulary: only the hash
    r = train_py(*small_job_overrides(tmp_path / "run", shards, "data.verify=true"))
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {shards / name}: sha256 differs from the manifest (corrupted?)"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- Ctrl-C -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_saves_releases_the_run_lock_and_resume_continues(tmp_path, small_shards):
    run_dir = tmp_path / "run"
    args = small_job_overrides(
        run_dir,
        small_shards,
        "train.max_steps=100000",
        "checkpoint.interval=3",
        "data.verify=true",  # intact shards pass the check
        "logging.progress=false",
    )
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=rank_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    last = steps[-1]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert f"step_{last:08d}" in ckpts, ckpts  # the interrupted step was saved
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]  # nothing half-written

    # The lock is free and the same command resumes after the saved step.
    more = [
        a if not a.startswith("train.max_steps") else f"train.max_steps={last + 2}" for a in args
    ]
    r = train_py(*more)
    assert r.returncode == 0, r.stderr
    after = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [row["step"] for row in after if "loss" in row][-2:] == [last + 1, last + 2]


# -- pipeline stage configs --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "override", "message"),
    [
        ("data_pipeline.dedup", "threshold=1.5", "threshold must be in (0, 1], got 1.5"),
        ("data_pipeline.tokenize", "validation_fraction=nan", "must be in [0, 1), got nan"),
        ("data_pipeline", "missing_stages=maybe", "missing_stages must be error or skip"),
    ],
)
def test_pipeline_stage_refuses_a_bad_value_before_any_work(tmp_path, stage, override, message):
    out = tmp_path / "out"
    args = ["work_dir=" + str(tmp_path / "w")] if stage == "data_pipeline" else []
    if stage != "data_pipeline":
        args = [f"input={tmp_path / 'missing.jsonl'}", f"output={out}"]
    r = subprocess.run(
        [sys.executable, "-m", stage, *args, override],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: invalid config: ") and message in last, r.stderr
    assert "Traceback" not in r.stderr and not any(tmp_path.iterdir())


def test_pipeline_configs_check_their_ranges_when_built():
    from data_pipeline.runtime.scaleout import RayOptions, ScaleOut, SlurmOptions
    from data_pipeline.stages.clean import CleanConfig
    from data_pipeline.stages.merge import MergeConfig
    from data_pipeline.stages.reddit import RedditConfig, RedditFilters

    cases = [
        (lambda: ScaleOut(tasks=-1), "tasks must be >= 0, got -1"),
        (lambda: ScaleOut(executor="k8s"), "executor must be local, slurm or ray, got 'k8s'"),
        (lambda: ScaleOut(slurm=SlurmOptions(cpus_per_task=0)), "slurm.cpus_per_task must be"),
        (lambda: ScaleOut(ray=RayOptions(mem_per_cpu_gb=float("nan"))), "ray.mem_per_cpu_gb"),
        (lambda: CleanConfig(max_blank_lines=-2), "max_blank_lines must be -1 or >= 0, got -2"),
        (lambda: RedditConfig(orphans="adopt"), "orphans must be keep or drop, got 'adopt'"),
        (lambda: RedditFilters(max_depth=-1), "filters.max_depth must be >= 0, got -1"),
        (lambda: MergeConfig(max_shard_tokens=0), "max_shard_tokens must be >= 1, got 0"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError) as e:
            build()
        assert message in str(e.value)
    assert CleanConfig(max_blank_lines=-1).max_blank_lines == -1
