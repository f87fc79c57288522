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
