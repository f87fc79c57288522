import json
import shutil

import pytest
import torch

from opt_train.checkpoint.manager import CheckpointManager
from opt_train.config import CheckpointConfig
from opt_train.train.callbacks.base import Callback
from opt_train.train.trainer import Trainer
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
    # The same fp32 terms summed in another grouping (and batch 2 vs 4 picks other matmul
    # blockings): ~1e-7 relative for a regrouped fp32 sum; measured bit-equal here.
    assert la == pytest.approx(lb, rel=1e-6)
    # Gradients are sums whose terms cancel, so their rounding is relative to the largest
    # terms, not to each element: measured up to 1.5e-4 of a tensor's largest update (fc and
    # attention weights). The key bias's true gradient is zero (softmax ignores a per-query
    # constant); it holds rounding of ~1e-16, hence the absolute floor. A dropped or
    # double-counted micro-batch, or a wrong divisor, is an O(1) difference.
    for (name, pa), (_, pb), p0 in zip(
        a.model.named_parameters(), b.model.named_parameters(), before, strict=True
    ):
        da, db = pa - p0, pb - p0
        assert (da - db).abs().max() <= 1e-3 * db.abs().max() + 1e-12, name
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
    run_manager = CheckpointManager(ckpts, CheckpointConfig(), None, run_lock_held=True)
    assert run_manager.latest().name == "step_00000002"
    assert not (ckpts / ".tmp-step_00000004").exists()  # the run's manager cleans it up


@pytest.fixture(scope="module")
def fp32_rows(tmp_path_factory, small_shards) -> list[dict]:
    run = tmp_path_factory.mktemp("fp32") / "run"
    Trainer(small_job(run, small_shards, "train.max_steps=8")).fit()
    return [r for r in metrics(run) if "loss" in r]


@pytest.mark.parametrize("precision, rel", [("bf16", 2**-8), ("fp16", 2 * 2**-11)])
def test_low_precision_losses_follow_fp32_within_their_rounding(
    tmp_path, small_shards, fp32_rows, precision, rel
):
    """Autocast rounds matmul inputs to 8 (bf16) or 11 (fp16) significant bits, unit roundoff
    2^-8 = 3.9e-3 and 2^-11 = 4.9e-4 per op, averaging out over the many terms of a mean loss:
    the losses stay within one bf16 unit roundoff and two fp16 ones (measured over these 8
    steps: at most 6.5e-4 for bf16, 3.4e-4 for fp16). A step that did not train, or trained on
    other samples or at another LR, moves the loss by several percent by step 8."""
    run = tmp_path / precision
    Trainer(small_job(run, small_shards, "train.max_steps=8", f"precision={precision}")).fit()
    rows = [r for r in metrics(run) if "loss" in r]
    assert fp32_rows[-1]["loss"] < 0.95 * fp32_rows[0]["loss"]  # the comparison has teeth
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in fp32_rows], rel=rel)
    assert not any(r["skipped"] for r in rows)
    # bf16 needs no scaling; fp16 starts at metaseq's 4 and has no reason to change in 8 steps.
    assert [r["loss_scale"] for r in rows] == [4.0 if precision == "fp16" else 1.0] * 8


def test_mfu_is_model_flops_over_peak_counted_from_the_model_itself(
    tmp_path, small_shards, fp32_rows
):
    """MFU = tokens/s x training FLOPs per token / (world x peak). FLOPs per token counted
    here from the model's own matmuls: 6 x the weights of every nn.Linear plus the tied
    output projection (the token embedding), plus attention's scores and values, 2 matmuls of
    seq_len x d_model per token per layer, 3 passes: 12 x layers x d_model x seq_len."""
    from opt_train.model.opt import OPT

    cfg = small_job(tmp_path / "run", small_shards)
    model = OPT(cfg.model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    matmul_weights = linear + model.embed_tokens.weight.numel()
    assert matmul_weights == 2 * 12 * 32 * 32 + 512 * 32  # 2 layers of d=32, vocab 512
    per_token = 6 * matmul_weights + 12 * cfg.model.n_layers * cfg.model.d_model * 32
    peak = cfg.logging.peak_tflops * 1e12
    for r in fp32_rows:
        assert r["tokens_per_s"] == pytest.approx(256 / r["step_time_s"], rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / peak, rel=1e-9)
        assert 0 < r["mfu"] < 1


def test_fp16_loss_scale_halves_and_skips_on_overflow_and_doubles_after_its_window(
    tmp_path, small_shards, fp32_rows
):
    """A scale of 2^30 overflows fp16 gradients (per-logit gradients ~ 2^30 / 128 tokens >
    65504): the step is skipped and the scale halved until gradients fit; then it doubles
    after every `window` overflow-free steps."""
    run = tmp_path / "run"
    over = ["precision=fp16", "loss_scale.init=1073741824", "loss_scale.window=2"]
    Trainer(small_job(run, small_shards, "train.max_steps=20", *over)).fit()
    rows = [r for r in metrics(run) if "loss" in r]
    skipped = [r["skipped"] for r in rows]
    k = skipped.index(False)  # the first step that trained
    assert k > 0 and all(skipped[:k])
    # metaseq's rule, step by step: halve on overflow, double after `window` good steps.
    want, scale, good = [], 2.0**30, 0
    for overflowed in skipped:
        want.append(scale)
        scale, good = (scale / 2, 0) if overflowed else (scale, good + 1)
        if good == 2:
            scale, good = scale * 2, 0
    assert [r["loss_scale"] for r in rows] == want
    assert sum(skipped[k:]) < len(skipped[k:]) / 2  # mostly training once the scale fits
    assert all(r["nonfinite_skips"] == 0 for r in rows)  # overflow is not divergence


def test_fp16_loss_scale_is_restored_on_resume(tmp_path, small_shards):
    run = tmp_path / "run"
    t = Trainer(small_job(run, small_shards, "train.max_steps=2", "precision=fp16"))
    t.scaler.scale, t.scaler.good_steps = 0.5, 7
    t.fit()
    back = Trainer(small_job(run, small_shards, "train.max_steps=2", "precision=fp16"))
    assert back.scaler.scale == t.scaler.scale and back.scaler.good_steps == t.scaler.good_steps


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
        (3, "goodput"),  # the ledger's closing row (docs/observability.md)
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
    assert [r for r in metrics(run) if "event" not in r][-1]["seen"] == 4
