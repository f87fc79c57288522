import os
from pathlib import Path

import pytest

# Tests run on CPU with a couple of threads: the machines have 2 cores, and a fixed thread
# count keeps floating-point reductions reproducible between runs.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def opt_tokenizer_dir() -> Path:
    """OPT's real vocab.json/merges.txt from ../shared (not part of the project)."""
    d = Path(os.environ.get("OPT_TOKENIZER_DIR", REPO.parent / "shared" / "opt-tokenizer"))
    if not (d / "vocab.json").is_file():
        pytest.fail(f"OPT tokenizer files not found at {d}; set OPT_TOKENIZER_DIR")
    return d


@pytest.fixture(scope="session")
def garbage_corpus(tmp_path_factory) -> tuple[Path, set[int]]:
    """The spike-recovery corpus (tests/opt_train/garbage.py): (shards, garbage windows)."""
    from tests.opt_train.garbage import build_garbage_corpus

    return build_garbage_corpus(tmp_path_factory.mktemp("garbage"))


@pytest.fixture(scope="session")
def two_rank_rollback(garbage_corpus, tmp_path_factory):
    """`run(mesh)`: the run_dir of a 2-rank torchrun run with stability on over the garbage
    corpus (tests/opt_train/garbage.py's TWO_RANKS with `mesh`), run once a session. The
    replay-by-hand test and the two-node Slurm test both compare against it."""
    from tests.multirank import torchrun_train
    from tests.opt_train.garbage import STABLE, TWO_RANKS, overrides

    runs: dict[str, Path] = {}

    def run(mesh: str) -> Path:
        if mesh not in runs:
            run_dir = tmp_path_factory.mktemp("rollback") / "auto"
            data, _ = garbage_corpus
            out = torchrun_train(2, overrides(run_dir, data, *TWO_RANKS, mesh, *STABLE))
            assert out.returncode == 0, out.stderr[-3000:]
            runs[mesh] = run_dir
        return runs[mesh]

    return run


# Session fixtures that cost a run each: under pytest-xdist every worker would build its own,
# so the tests that use one are sent to the same worker (`--dist loadgroup`, pyproject.toml).
SHARED_RUNS = {"fp32_mesh_run": "fp32_mesh", "two_rank_rollback": "rollback", "local_ray": "ray"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, group in SHARED_RUNS.items():
            if fixture in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(group))
                break
