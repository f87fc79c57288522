"""What a user watching a run gets: console lines in a log, a bar on a terminal, TensorBoard
scalars, wandb's run settings, the plot command and profiler traces; all from real runs."""

import fcntl
import io
import json
import logging
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from opt_train.tools.plot import draw
from opt_train.train.callbacks.base import Callback
from opt_train.train.callbacks.console import ConsoleLines, console_callback
from opt_train.train.trainer import Trainer
from tests.opt_train.conftest import REPO, make_config, small_job, small_job_overrides
from tests.opt_train.garbage import steps
from tests.opt_train.test_stability import _Poison


def rows(run_dir) -> list[dict]:
    """metrics.jsonl's rows but the goodput ledger's (timings, in every run)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") != "goodput"]


class _Spike(Callback):
    """Logs an event row at step 2, as the stability callbacks do."""

    def on_step_end(self, trainer, metrics):
        if trainer.step == 2:
            trainer.log_event("spike", loss=metrics["loss"], threshold=1.5)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_shards):
    """Two finished 4-step runs (different LRs) with TensorBoard on, an eval at steps 2 and 4
    and a spike event at step 2 in the first."""
    root = tmp_path_factory.mktemp("runs")
    common = ["train.max_steps=4", "train.eval_interval=2", "logging.tensorboard=true"]
    a, b = root / "lr-1e-2", root / "lr-3e-3"
    t = Trainer(small_job(a, small_shards, *common), callbacks=[_Spike()])
    t.fit()
    t.close()
    t = Trainer(small_job(b, small_shards, *common, "optim.lr=0.003"))
    t.fit()
    t.close()
    return a, b


@pytest.mark.slow
def test_a_run_logged_to_a_file_prints_plain_lines_without_carriage_returns(tmp_path, small_shards):
    run = tmp_path / "run"
    args = small_job_overrides(
        run,
        small_shards,
        "train.max_steps=5",
        "train.eval_interval=4",
        "logging.progress=true",
        "logging.interval=2",
    )
    with open(tmp_path / "out.log", "wb") as out, open(tmp_path / "err.log", "wb") as err:
        subprocess.run(
            [sys.executable, "train.py", *args], cwd=REPO, stdout=out, stderr=err, check=True
        )
    raw = (tmp_path / "out.log").read_bytes() + (tmp_path / "err.log").read_bytes()
    assert b"\r" not in raw
    lines = (tmp_path / "out.log").read_text().splitlines()
    assert lines[0].startswith("device cpu | world size 1 | mesh dp_replicate=1 dp_shard=1 tp=1")
    assert re.match(r"model opt-tiny: [\d.]+M parameters \| [\d,]+ tokens per step", lines[1])
    assert lines[2].startswith("fresh start (no checkpoint in")
    # The precision once, with the reason it was chosen.
    assert lines[3].startswith("precision fp32 (")
    assert sum("precision" in line for line in lines[:4]) == 1
    steps = {r["step"]: r for r in rows(run) if "loss" in r}
    step_lines = [x for x in lines if re.match(r"step \d+/5 ", x)]
    # The first step, every `logging.interval` steps, and the last.
    assert [int(x.split()[1].split("/")[0]) for x in step_lines] == [1, 2, 4, 5]
    for line in step_lines:
        n = int(line.split()[1].split("/")[0])
        for field in (
            f"loss {steps[n]['loss']:.4f}",
            f"lr {steps[n]['lr']:.3e}",
            f"grad norm {steps[n]['grad_norm']:.3f}",
            "loss scale 1 |",
            " tok/s |",
            "| MFU ",
            " GiB peak RSS |",
            "| ETA ",
        ):
            assert field in line, (field, line)
    assert step_lines[-1].endswith("ETA 0:00:00")
    (val,) = [r for r in rows(run) if "val_loss" in r]
    assert f"step 4 | val_loss {val['val_loss']:.4f}" in lines
    assert lines[-2] == "finished at step 5 (1,280 tokens)"
    # Then the goodput ledger's one line (tests/opt_train/test_goodput.py checks its numbers).
    assert re.match(r"goodput [\d.]+% of .* wall time \(1 process\): .*startup ", lines[-1])


def test_the_console_says_where_it_resumed_and_prints_event_rows(tmp_path, small_shards):
    run = tmp_path / "run"
    first = io.StringIO()
    t = Trainer(
        small_job(run, small_shards, "train.max_steps=2"),
        callbacks=[ConsoleLines(1, stream=first), _Spike()],
    )
    t.fit()
    t.close()
    (spike,) = [r for r in rows(run) if r.get("event") == "spike"]
    assert f"step 2 | event spike | loss={spike['loss']:.4g} threshold=1.5" in (
        first.getvalue().splitlines()
    )
    again = io.StringIO()
    t = Trainer(
        small_job(run, small_shards, "train.max_steps=3"), callbacks=[ConsoleLines(1, again)]
    )
    t.fit()
    t.close()
    header = again.getvalue().splitlines()[2]
    assert header.startswith(f"resumed from {run / 'checkpoints' / 'step_00000002'} (step 2, 512")


def test_on_a_terminal_the_console_is_a_progress_bar_with_the_same_fields(tmp_path, small_shards):
    master, slave = pty.openpty()
    # A terminal 250 columns wide (a new pty is 0 x 0, where tqdm draws nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    try:
        tty = os.fdopen(slave, "w")
        cfg = small_job(tmp_path / "run", small_shards, "train.max_steps=3")
        bar = console_callback(cfg, stream=tty)
        assert type(bar).__name__ == "ProgressBar"
        t = Trainer(cfg, callbacks=[bar])
        t.fit()
        t.close()
        tty.flush()
        chunks = []
        while select.select([master], [], [], 0.5)[0]:
            chunks.append(os.read(master, 1 << 16))
        out = b"".join(chunks).decode()
    finally:
        os.close(master)
        tty.close()
    loss3 = [r for r in rows(tmp_path / "run") if "loss" in r][-1]["loss"]
    assert "\rtrain: 100%" in out and "3/3" in out  # tqdm redraws in place
    for field in (f"loss {loss3:.4f}", "grad norm", "loss scale 1", "tok/s", "MFU", "GiB"):
        assert field in out, field
    assert "device cpu | world size 1" in out and "finished at step 3" in out


def test_tensorboard_holds_the_metrics_scalars_under_their_names(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = two_runs[0]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "mfu", "val_loss"} <= tags
    steps = [r for r in rows(run) if "loss" in r and "event" not in r]
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    # TensorBoard stores float32: ~6e-8 relative.
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [e.step for e in acc.Scalars("val_loss")] == [2, 4]
    assert [e.step for e in acc.Tensors("events/text_summary")] == [2]


@pytest.mark.slow
def test_plot_draws_one_finished_run_and_two_overlaid(tmp_path, two_runs):
    a, b = two_runs
    for dirs, png in (([a], tmp_path / "one.png"), ([a, b], tmp_path / "two.png")):
        subprocess.run(
            [sys.executable, "-m", "opt_train.plot", *map(str, dirs), "-o", str(png)],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (1500, 800)
            assert len(im.convert("L").getcolors(1 << 16)) > 50  # drawn, not blank
    assert (tmp_path / "one.png").read_bytes() != (tmp_path / "two.png").read_bytes()
    fig = draw([a, b])
    loss_ax = fig.axes[0]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [
        "lr-1e-2",
        "lr-3e-3",
        "event: spike",
    ]
    # Per run: the loss curve and the val loss curve; then the spike marker.
    xs = [list(line.get_xdata()) for line in loss_ax.get_lines()]
    assert xs[:2] == [[256, 512, 768, 1024], [512, 1024]]
    assert [256 * 2] in xs


def test_plot_names_a_directory_without_metrics(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "opt_train.plot", str(tmp_path), "-o", str(tmp_path / "x.png")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and f"{tmp_path / 'metrics.jsonl'}: no such file" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_the_profiler_writes_a_trace_of_the_requested_steps(tmp_path, small_shards, caplog):
    run = tmp_path / "run"
    cfg = small_job(
        run,
        small_shards,
        "train.max_steps=4",
        "profile.enabled=true",
        "profile.steps=[2,3]",
        "profile.memory_snapshot=true",
    )
    with caplog.at_level(logging.WARNING, logger="opt_train.train.callbacks.profiling"):
        t = Trainer(cfg)
        t.fit()
        t.close()
    assert "profile.memory_snapshot is CUDA-only" in caplog.text
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["trace_steps2-3_rank0.json"]
    trace = json.loads((run / "profile" / "trace_steps2-3_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"step 2", "step 3"} <= names and "step 1" not in names and "step 4" not in names
    assert any(str(n).startswith("aten::") for n in names)  # the ops themselves are there


def test_the_profiler_window_meets_the_end_of_a_run_and_a_resume(tmp_path, small_shards, caplog):
    run = tmp_path / "run"

    def fit(*extra):
        t = Trainer(small_job(run, small_shards, "profile.enabled=true", *extra))
        t.fit()
        t.close()

    fit("train.max_steps=2", "profile.steps=[2,5]")  # ends inside the window: keeps step 2
    fit("train.max_steps=3", "profile.steps=[1,3]")  # resumed at 2: records step 3
    with caplog.at_level(logging.WARNING, logger="opt_train.train.callbacks.profiling"):
        fit("train.max_steps=3", "profile.steps=[1,2]")  # resumed at 3: nothing left to record
    assert "profile.steps=[1, 2] is already past (resumed at step 3)" in caplog.text
    traces = sorted(p.name for p in (run / "profile").iterdir())
    assert traces == ["trace_steps2-2_rank0.json", "trace_steps3-3_rank0.json"]
    for name, step in zip(traces, (2, 3), strict=True):
        names = {
            e.get("name") for e in json.loads((run / "profile" / name).read_text())["traceEvents"]
        }
        assert {n for n in names if str(n).startswith("step ")} == {f"step {step}"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("logging.console=fancy", "logging.console must be auto, bar or lines"),
        ("logging.interval=0", "logging.interval must be >= 1"),
        ("profile.steps=[3,2]", "profile.steps must be [first, last]"),
        ("profile.steps=[4]", "profile.steps must be [first, last]"),
    ],
)
def test_bad_observability_keys_are_named(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_config(override)


class _SeeWandbRun(Callback):
    """Runs after the built-in Wandb callback's on_start: records what the live run says."""

    def on_start(self, trainer):
        wb = next(c for c in trainer.callbacks if type(c).__name__ == "Wandb")
        run = wb._run
        self.seen = (run.entity, run.project, run.name, run.group, tuple(run.tags), run.offline)


@pytest.mark.slow
def test_wandb_run_gets_entity_name_group_and_tags_and_no_secret(
    tmp_path, small_shards, monkeypatch
):
    secret = "sk-test-fedcba9876543210-do-not-leak"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run = tmp_path / "run"
    cfg = small_job(
        run,
        small_shards,
        "train.max_steps=1",
        "logging.wandb=offline",
        "logging.wandb_project=opt-sweeps",
        "logging.wandb_entity=my-team",
        "logging.wandb_name=tiny-lr-sweep-3",
        "logging.wandb_group=lr-sweep",
        "logging.wandb_tags=[ablation,opt-tiny]",
    )
    see = _SeeWandbRun()
    t = Trainer(cfg, callbacks=[see])
    t.fit()
    t.close()
    assert see.seen == (
        "my-team",
        "opt-sweeps",
        "tiny-lr-sweep-3",
        "lr-sweep",
        ("ablation", "opt-tiny"),
        True,
    )
    assert any((run / "wandb").glob("offline-run-*"))
    for f in run.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def wandb_history(run_dir: Path) -> tuple[list[dict], list]:
    """The history rows and metric definitions of the offline wandb run in `run_dir`, read
    from wandb's own files: each `offline-run-*/run-*.wandb` is a LevelDB-style log (a 7-byte
    `:W&B` header, then 32 KiB blocks of records, each `<crc32 u32><length u16><type u8>` and
    its bytes; a record split across blocks is FIRST, MIDDLE..., LAST) of wandb's protobuf
    `Record`s. wandb 0.31's Python package has no reader of its own (its core, in Go, writes
    them)."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, metrics = [], []
    paths = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert paths, run_dir
    for path in paths:
        data, ended = path.read_bytes(), False
        assert data[:7] == b":W&B\xe1\xbe\x00", path  # ident, magic 0xBEE1, version 0
        pos, parts = 7, b""
        while pos < len(data):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0:  # zero padding to the end of the block
                pos += left
                continue
            chunk = data[pos + 7 : pos + 7 + n]
            assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, (path, pos)
            pos += 7 + n
            parts += chunk
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = pb.Record()
                record.ParseFromString(parts)
                parts = b""
                if record.HasField("history"):
                    history.append(
                        {
                            i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item
                        }
                    )
                elif record.HasField("metric"):
                    metrics.append(record.metric)
                ended = record.HasField("exit")
        assert ended, f"{path}: no exit record (the run is not finished)"
    return history, metrics


@pytest.fixture(scope="module")
def rolled_back_run(tmp_path_factory, small_shards) -> tuple[Path, str]:
    """(run_dir, what the terminal showed) of a 24-step run with stability on, a bar on a pty
    and wandb offline, whose weights turn NaN before step 14: steps 14 and 15 are skipped, at
    16 it rolls back to checkpoint 10, skips the batches of steps 11-16 and replays 11-24."""
    import wandb

    run = tmp_path_factory.mktemp("rollback") / "run"
    cfg = small_job(
        run,
        small_shards,
        "train.max_steps=24",
        "checkpoint.interval=5",
        "checkpoint.keep=3",
        "stability.enabled=true",
        "stability.window=5",
        "stability.nonfinite_steps=3",
        "logging.wandb=offline",
    )
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    chunks: list[bytes] = []

    def read() -> None:  # drained as it comes, so a full pty buffer never blocks the run
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO once the other end is closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("WANDB_MODE", raising=False)  # tests/conftest.py disables wandb
            tty = os.fdopen(slave, "w")
            t = Trainer(cfg, callbacks=[console_callback(cfg, stream=tty), _Poison(14)])
            t.fit()
            t.close()
            tty.close()
            # run.finish() returns before wandb's service has written all of the .wandb file
            # (seen: a record half written when read); its shutdown closes the file.
            wandb.teardown()
        reader.join(30)
    finally:
        os.close(master)
    # The rollback itself (test_stability's poisoned run, checked here once with the bar and
    # wandb on): two non-finite steps skipped, back to checkpoint 10, every step logged finite.
    events = [r for r in rows(run) if "event" in r]
    assert [(e["event"], e["step"]) for e in events] == [("spike", 16), ("rollback", 16)]
    assert events[0]["reason"] == "nonfinite" and events[0]["onset"] == 14
    assert (events[1]["to_step"], events[1]["skip_steps"]) == (10, [11, 16])
    got = steps(run)
    assert sorted(got) == list(range(1, 25))
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in got.values())
    return run, b"".join(chunks).decode()


@pytest.mark.slow
def test_wandb_keeps_the_replayed_steps_of_a_rollback(rolled_back_run):
    run, _ = rolled_back_run
    history, metrics = wandb_history(run)
    # Every metric is charted against the training step.
    assert any(m.glob_name == "*" and m.step_metric == "trainer/step" for m in metrics)
    step_rows = [h for h in history if "loss" in h]
    # Steps 1-15 (14 and 15 NaN, skipped), then the replay from checkpoint 10: a row each,
    # though wandb drops any `step=` lower than one it has seen.
    logged = [h.get("trainer/step") for h in step_rows]
    assert logged == [*range(1, 16), *range(11, 25)], (logged, len(history))
    assert [h["_step"] for h in history] == list(range(len(history))), history
    final = {r["step"]: r for r in rows(run) if "loss" in r and "event" not in r}
    replay = step_rows[15:]
    # The replay's rows are metrics.jsonl's (floats pass through JSON unchanged).
    assert [(h["loss"], h["lr"]) for h in replay] == [
        (final[s]["loss"], final[s]["lr"]) for s in range(11, 25)
    ]
    spike = [h for h in history if "events/spike" in h]
    rollback = [h for h in history if "events/rollback" in h]
    assert [h["trainer/step"] for h in spike] == [16]
    assert [(h["trainer/step"], h["events/rollback/to_step"]) for h in rollback] == [(16, 10)]


def test_after_a_rollback_the_bar_shows_the_step_it_went_back_to(rolled_back_run):
    _, out = rolled_back_run
    before, rollback, after = out.partition("step 16 | event rollback | to_step=10")
    assert rollback, out[-3000:]
    position = re.compile(r"train:\s+\d+%\|[^|]*\| (\d+)/24")
    shown_before = [int(m) for m in position.findall(before)]
    shown_after = [int(m) for m in position.findall(after)]
    assert max(shown_before) == 15
    # At once the checkpoint's step, then forward with the replay, to the end.
    assert shown_after[0] == 10, shown_after
    assert shown_after == sorted(shown_after) and shown_after[-1] == 24
    assert "finished at step 24" in after
