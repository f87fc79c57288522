import json
import shutil

import pytest
import torch

from opt_train.callbacks import Callback
from opt_train.checkpoint import CheckpointManager
from opt_train.config import CheckpointConfig
from opt_train.trainer import Trainer
from tests.opt_train.conftest import small_job

FIELDS = {"step", "loss", "lr", "grad_norm", "loss_scale", "tokens", "tokens_per_s", "mfu"}


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def test_loss_falls_and_metrics_rows_have_the_contract_fields(tmp_path, small_shards):
    cfg = small_job(tmp_path / "run", small_shards, "train.max_steps=30", "train.eval_interval=10")
    Trainer(cfg).fit()
    rows = metrics(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(FIELDS <= r.keys() for r in steps)
    assert steps[-1]["tokens"] == 30 * 256
    assert steps[-1]["loss"] < 0.9 * steps[0]["loss"]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (
        CheckpointManager(tmp_path / "run" / "checkpoints", CheckpointConfig(), None).latest().name
        == "step_00000030"
    )


def test_two_micro_batches_of_two_equal_one_of_four(tmp_path, small_shards):
    # Adam's first step is lr * g / (|g| + eps): with the default eps, near-zero gradients
    # (sums that cancel) turn rounding into sign flips of size lr. eps=1 makes the step
    # ~lr * g, so equal updates mean equal accumulated gradients.
    common = ["train.max_steps=1", "train.batch_tokens=128", "optim.eps=1.0"]
    a = Trainer(small_job(tmp_path / "a", small_shards, *common, "train.micro_batch_size=2"))
    b = Trainer(small_job(tmp_path / "b", small_shards, *common, "train.micro_batch_size=4"))
    assert a.accum == 2 and b.accum == 1
    before = [p.detach().clone() for p in a.model.parameters()]
    la, lb = a.fit()["loss"], b.fit()["loss"]
    # fp32 sums of the same terms in another grouping: ~1e-6 relative.
    assert la == pytest.approx(lb, rel=1e-5)
    for (name, pa), (_, pb), p0 in zip(
        a.model.named_parameters(), b.model.named_parameters(), before, strict=True
    ):
        torch.testing.assert_close(pa - p0, pb - p0, rtol=1e-4, atol=1e-9, msg=name)
    assert any(not torch.equal(p, p0) for p, p0 in zip(a.model.parameters(), before, strict=True))


def test_rerun_with_same_run_dir_resumes_with_identical_losses(tmp_path, small_shards):
    """Dropout on: the RNG state must come back too, not just weights and data position."""
    common = ["model.dropout=0.1", "model.attention_dropout=0.1", "checkpoint.interval=3"]
    straight = tmp_path / "straight"
    Trainer(small_job(straight, small_shards, "train.max_steps=6", *common)).fit()
    split = tmp_path / "split"
    Trainer(small_job(split, small_shards, "train.max_steps=3", *common)).fit()
    resumed = Trainer(small_job(split, small_shards, "train.max_steps=6", *common))
    assert resumed.step == 3 and resumed.resumed_from.endswith("step_00000003")
    resumed.fit()
    assert step_losses(split) == step_losses(straight)  # bit for bit


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, small_shards):
    run = tmp_path / "run"
    Trainer(small_job(run, small_shards, "train.max_steps=4", "checkpoint.interval=2")).fit()
    newest = run / "checkpoints" / "step_00000004"
    with open(newest / "__0_0.distcp", "r+b") as f:  # flip bytes inside the weights
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    t = Trainer(small_job(run, small_shards, "train.max_steps=4", "checkpoint.interval=2"))
    assert t.step == 2


def test_steps_logged_after_the_last_checkpoint_appear_once_after_resume(tmp_path, small_shards):
    run = tmp_path / "run"
    Trainer(small_job(run, small_shards, "train.max_steps=4", "checkpoint.interval=2")).fit()
    # As if the run died after logging steps 3-4 but before step 4's checkpoint existed.
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    Trainer(small_job(run, small_shards, "train.max_steps=4", "checkpoint.interval=2")).fit()
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_half_written_checkpoint_is_invisible(tmp_path, small_shards):
    run = tmp_path / "run"
    Trainer(small_job(run, small_shards, "train.max_steps=2", "checkpoint.interval=2")).fit()
    ckpts = run / "checkpoints"
    # What a kill mid-save leaves: a temporary directory, never a step_* directory.
    shutil.copytree(ckpts / "step_00000002", ckpts / ".tmp-step_00000004")
    (ckpts / ".tmp-step_00000004" / "meta.json").unlink()
    assert CheckpointManager(ckpts, CheckpointConfig(), None).latest().name == "step_00000002"
    assert not (ckpts / ".tmp-step_00000004").exists()  # the leftover is cleaned up


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_steps_train_and_log_loss_scale(tmp_path, small_shards, precision):
    run = tmp_path / precision
    Trainer(small_job(run, small_shards, "train.max_steps=8", f"precision={precision}")).fit()
    rows = [r for r in metrics(run) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    want_scale = 4.0 if precision == "fp16" else 1.0
    assert rows[0]["loss_scale"] == want_scale


def test_fp16_loss_scale_is_restored_on_resume(tmp_path, small_shards):
    run = tmp_path / "run"
    t = Trainer(small_job(run, small_shards, "train.max_steps=2", "precision=fp16"))
    t.scaler.scale, t.scaler.good_steps = 0.5, 7
    t.fit()
    back = Trainer(small_job(run, small_shards, "train.max_steps=2", "precision=fp16"))
    assert back.scaler.scale == t.scaler.scale and back.scaler.good_steps == t.scaler.good_steps


def test_hf_export_cli_converts_a_checkpoint(tmp_path, small_shards):
    from transformers import OPTForCausalLM

    from opt_train.hf import main

    run = tmp_path / "run"
    t = Trainer(small_job(run, small_shards, "train.max_steps=1"))
    t.fit()
    main([str(run), str(tmp_path / "hf")])
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (hf(x).logits - t.model.eval()(x)).abs().max().item() < 1e-4


@pytest.mark.slow
def test_wandb_offline_run_lives_in_run_dir_without_secrets(tmp_path, small_shards, monkeypatch):
    secret = "sk-test-0123456789abcdef-do-not-leak"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run = tmp_path / "run"
    Trainer(small_job(run, small_shards, "train.max_steps=2", "logging.wandb=offline")).fit()
    assert any((run / "wandb").glob("offline-run-*")), "no offline wandb run in run_dir"
    for f in run.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


class _Watcher(Callback):
    """Adds a key to every step's metrics, logs an event at step 2, asks to stop at step 3,
    and keeps a count that must survive a restart."""

    def __init__(self):
        self.seen = 0

    def on_step_end(self, trainer, metrics):
        self.seen += 1
        metrics["seen"] = self.seen
        if trainer.step == 2:
            trainer.log_event("spike", loss=metrics["loss"])
        if trainer.step == 3:
            trainer.request_stop("test asked")

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_a_callback_adds_metrics_writes_events_stops_the_run_and_keeps_its_state(
    tmp_path, small_shards
):
    run = tmp_path / "run"
    t = Trainer(small_job(run, small_shards, "train.max_steps=10"), callbacks=[_Watcher()])
    last = t.fit()
    assert last["step"] == 3 and t.stop_reason == "test asked" and not t.preempted
    rows = metrics(run)
    # An event logged in on_step_end is written before that step's row.
    assert [(r["step"], r.get("event")) for r in rows] == [
        (1, None),
        (2, "spike"),
        (2, None),
        (3, None),
    ]
    assert [r["seen"] for r in rows if "loss" in r and "event" not in r] == [1, 2, 3]
    assert rows[1]["loss"] == rows[2]["loss"]
    ckpts = CheckpointManager(run / "checkpoints", CheckpointConfig(), None)
    assert ckpts.latest().name == "step_00000003"  # a requested stop saves like the end
    state = json.loads((ckpts.latest() / "state.json").read_text())
    assert state["callbacks"] == {"_Watcher": {"seen": 3}}
    back = Trainer(small_job(run, small_shards, "train.max_steps=4"), callbacks=[_Watcher()])
    assert back.callbacks[-1].seen == 3
    back.fit()
    assert metrics(run)[-1]["seen"] == 4
