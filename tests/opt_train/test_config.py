import subprocess
import sys

import pytest
import yaml

from tests.opt_train.conftest import REPO, make_config

PAPER = {  # Zhang et al. 2022, Table 1: layers, heads, d_model, peak LR, batch tokens
    "opt-125m": (12, 12, 768, 6.0e-4, 0.5),
    "opt-350m": (24, 16, 1024, 3.0e-4, 0.5),
    "opt-1.3b": (24, 32, 2048, 2.0e-4, 1),
    "opt-2.7b": (32, 32, 2560, 1.6e-4, 1),
    "opt-6.7b": (32, 32, 4096, 1.2e-4, 2),
    "opt-13b": (40, 40, 5120, 1.0e-4, 4),
    "opt-30b": (48, 56, 7168, 1.0e-4, 4),
    "opt-66b": (64, 72, 9216, 0.8e-4, 2),
    "opt-175b": (96, 96, 12288, 1.2e-4, 2),
}


@pytest.mark.parametrize("name", PAPER)
def test_each_opt_size_carries_the_papers_shape_lr_and_batch(name):
    layers, heads, d, lr, batch_m = PAPER[name]
    cfg = make_config(f"+model={name}")
    m = cfg.model
    assert (m.n_layers, m.n_heads, m.d_model) == (layers, heads, d)
    assert m.ffn == 4 * d and m.vocab_size == 50272 and m.max_positions == 2048
    assert m.dropout == 0.1 and m.attention_dropout == 0.1 and m.init_std == 0.006
    assert cfg.optim.lr == pytest.approx(lr)
    assert cfg.train.batch_tokens == int(batch_m * 2**20) and cfg.data.seq_len == 2048
    assert cfg.optim.warmup_tokens == 375_000_000 and cfg.optim.decay_tokens == 300_000_000_000
    assert (m.pre_layer_norm, m.embed_dim) == ((False, 512) if name == "opt-350m" else (True, d))


def test_default_is_the_tiny_inline_model():
    cfg = make_config()
    assert cfg.model.name == "opt-tiny" and cfg.data.path is None and cfg.run_dir == "runs/opt-tiny"


def test_command_line_override_reaches_typed_config():
    cfg = make_config("+model=opt-125m", "data.seq_len=256", "model.dropout=0.0")
    assert cfg.data.seq_len == 256 and cfg.model.dropout == 0.0 and cfg.model.n_layers == 12


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cfg_job_composes_opt_2_7b_from_the_command_line():
    r = run_train("+model=opt-2.7b", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load(r.stdout)
    assert job["model"]["d_model"] == 2560 and job["optim"]["lr"] == 1.6e-4


def test_misspelt_key_stops_at_start_naming_valid_keys():
    r = run_train("train.max_stpes=3")
    assert r.returncode != 0
    assert "train.max_stpes" in r.stderr and "train.max_steps" in r.stderr
    assert "micro_batch_size" in r.stderr  # the valid keys are listed


def test_wrong_type_stops_at_start_naming_the_key():
    r = run_train("train.max_steps=many", "--cfg", "job")
    assert r.returncode != 0
    assert "Value 'many' of type 'str' could not be converted to Integer" in r.stderr
    assert "full_key: train.max_steps" in r.stderr


def test_invalid_value_is_rejected_with_the_key():
    r = run_train("precision=fp8", "train.max_steps=1", "logging.wandb=disabled")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        "error: invalid config: precision must be auto, bf16, fp16 or fp32, got 'fp8'"
    )


def test_batch_not_divisible_by_micro_batches_names_the_keys(tmp_path, small_shards):
    from opt_train.train.trainer import Trainer
    from tests.opt_train.conftest import small_job

    cfg = small_job(tmp_path, small_shards, "train.micro_batch_size=3")
    with pytest.raises(ValueError, match="train.micro_batch_size=3"):
        Trainer(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("export.dtype=int8", "export.dtype must be fp32, bf16 or fp16, got 'int8'"),
        ("export.max_shard_size=5XB", "export.max_shard_size must be a positive size"),
        (
            "train.micro_batch_size=0",
            "train.micro_batch_size must be >= 1 or null (derived), got 0",
        ),
    ],
)
def test_export_and_batch_values_are_checked_naming_the_key(override, message):
    with pytest.raises(Exception) as e:
        make_config(override)
    assert message in str(e.value.__cause__ or e.value)


def test_shard_sizes_parse_like_transformers():
    from opt_train.config import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("20KB") == 20_000 and parse_size(1000) == 1000


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("parallel.compile=yes", "parallel.compile must be auto, on or off, got 'yes'"),
        ("deepspeed.stage=4", "deepspeed.stage must be 1, 2 or 3, got 4"),
        ("logging.wandb=offlien", "logging.wandb must be offline, online or disabled"),
    ],
)
def test_a_bad_choice_on_the_command_line_names_the_choices_the_schema_declares(override, message):
    from opt_train.overrides import check_overrides

    with pytest.raises(SystemExit, match=message):
        check_overrides([override])
    with pytest.raises(Exception) as e:  # the same words from the schema, composed in Python
        make_config(override)
    assert message in str(e.value.__cause__ or e.value)


def test_choices_given_as_interpolations_or_valid_values_pass_the_command_line_check():
    from opt_train.overrides import check_overrides

    check_overrides(["parallel.compile=off", "deepspeed.stage=3", "precision=${oc.env:P,bf16}"])
