import contextlib
import logging
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipeline.shards import ShardWriter
from opt_train.config import JobConfig, register_configs

REPO = Path(__file__).resolve().parents[2]
SMALL_VOCAB = 512


def make_config(*overrides: str) -> JobConfig:
    """The real conf/train.yaml composed by real Hydra with `overrides`, as the typed config."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def train_on_ranks(nproc: int, overrides: list[str], says: tuple[str, ...] = ()) -> None:
    """What `torchrun --nproc_per_node=<nproc> train.py *overrides` computes, which must
    succeed: `train` on the config Hydra composes from `overrides`, each rank joining the
    env:// gloo group as under torchrun (opt_train/parallel/process_groups.py). One rank runs
    in this process; more are forked from tests/multirank.py's server, where torch and the
    trainer are already imported. A torchrun launch costs ~11 s of CPU on these machines
    (its agent and a fresh interpreter per rank, docs/benchmarks.md), so it is kept for the
    claims about the launch itself: signals, restarts, rendezvous, exit statuses, the CLI.
    Each of `says` must be in a message rank 0's `opt_train` loggers wrote (INFO and up, what
    rank 0 prints under train.py)."""
    if nproc == 1:
        _train_rank(0, 1, make_config(*overrides), says)
        return
    with training_ranks(nproc, overrides, says):
        pass


@contextlib.contextmanager
def training_ranks(
    nproc: int, overrides: list[str], says: tuple[str, ...] = (), timeout: float = 300
) -> Iterator[list[BaseProcess]]:
    """`train_on_ranks` on `nproc` forked ranks with the test running beside them: yields the
    rank processes (rank r at index r), then waits for the run to end and checks it; ranks
    still running `timeout` seconds after the start are killed."""
    from tests.multirank import forked

    cfg = make_config(*overrides)  # composed once; each forked rank trains on its own copy
    with forked(_train_rank, nproc, cfg, says, timeout=timeout, join_group=False) as ranks:
        yield ranks


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _train_rank(rank: int, world: int, cfg: JobConfig, says: tuple[str, ...] = ()) -> None:
    from opt_train.train.trainer import train

    if rank != 0 or not says:
        train(cfg)
        return
    logger, heard = logging.getLogger("opt_train"), _Messages()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(heard)
    try:
        train(cfg)
    finally:
        logger.removeHandler(heard)
        logger.setLevel(level)
    missing = [s for s in says if not any(s in m for m in heard.messages)]
    assert not missing, f"rank 0 never said {missing}; it said:\n" + "\n".join(heard.messages)


def write_patterned_shards(
    path: Path, vocab: int = SMALL_VOCAB, docs: int = 400, seed: int = 0
) -> Path:
    """Documents that follow a fixed successor table (token t is followed by succ[t]) from a
    random start: a model learns the table quickly, so the loss visibly falls."""
    rng = np.random.default_rng(seed)
    succ = 1 + rng.permutation(vocab - 1)  # never 0, the separator
    tok = {"name": "synthetic", "vocab_size": vocab, "eos_id": 0}
    with ShardWriter(path, tok, max_shard_tokens=5000) as w:
        for i in range(docs):
            ids = [int(rng.integers(1, vocab))]
            for _ in range(int(rng.integers(20, 120))):
                ids.append(int(succ[ids[-1] - 1]))
            w.add(np.array(ids), "validation" if i % 10 == 0 else "train")
    return path


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    return write_patterned_shards(tmp_path_factory.mktemp("data") / "shards")


def small_job(run_dir: Path, data: Path, *extra: str) -> JobConfig:
    """A fast job: 2-layer, 32-wide OPT over a 512-token vocabulary, fp32, no dropout."""
    return make_config(*small_job_overrides(run_dir, data, *extra))


def small_job_overrides(run_dir: Path, data: Path, *extra: str) -> list[str]:
    """`small_job`'s command-line overrides (for `python train.py ...` in a subprocess)."""
    return [
        f"run_dir={run_dir}",
        f"data.path={data}",
        f"model.vocab_size={SMALL_VOCAB}",
        "model.d_model=32",
        "model.n_heads=4",
        "model.dropout=0.0",
        "model.attention_dropout=0.0",
        "data.seq_len=32",
        "train.micro_batch_size=4",
        "train.batch_tokens=256",
        "train.eval_interval=0",
        "precision=fp32",
        "logging.wandb=disabled",
        "logging.progress=false",
        "logging.peak_tflops=1.0",
        "optim.warmup_tokens=512",
        "optim.lr=0.01",
        "optim.decay_tokens=8192",
        *extra,
    ]


@pytest.fixture(scope="session")
def fp32_mesh_run(small_shards, tmp_path_factory):
    """`run(nproc, *mesh) -> run_dir`: tests/opt_train/test_parallel.py's tiny fp32 run with a
    validation loss every 2 steps (its FP32_EVAL) on `nproc` ranks (`train_on_ranks`), run once
    a session per (nproc, mesh). The same runs serve three claims: test_parallel compares the
    meshes' losses with one process, test_multirank_eval the val_loss at 1 and 2 ranks, and
    test_deepspeed_engine ZeRO 1/2/3 with FSDP2 x 2."""
    from tests.opt_train.test_parallel import FP32_EVAL, launch

    runs: dict[tuple, Path] = {}

    def run(nproc: int, *mesh: str) -> Path:
        key = (nproc, *mesh)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp("fp32-mesh") / "run"
            launch(nproc, run_dir, small_shards, *FP32_EVAL, *mesh)
            runs[key] = run_dir
        return runs[key]

    return run
