"""Automatic loss-spike recovery (stability.*) through launch/slurm/train.sbatch on the real
two-node Slurm: a garbage document trips the detector on both nodes' ranks at the same step,
both roll back to the same checkpoint, and the job's metrics equal a local two-rank torchrun
run of the same config, bit for bit (each rank a node here, one process each on one thread)."""

from __future__ import annotations

import re
import sys
import time

import pytest

from tests.launch.test_train_sbatch import REPO, SBATCH, batch_log, finish, node_logs
from tests.multirank import torchrun_train
from tests.opt_train.test_stability import (
    STABLE,
    garbage_corpus,  # noqa: F401 (a fixture)
    garbage_steps,
    overrides,
    rows,
    steps,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The 2-rank FSDP2 case of tests/opt_train/test_stability.py: seed 21 puts a garbage window in
# the batch of step 23; with one sequence per rank the step's loss is ~1.7x the clean median.
COMMON = ["train.seed=21", "train.batch_tokens=256", "train.max_steps=24", *STABLE]


def test_a_two_node_job_rolls_back_on_every_rank_alike(
    slurm,
    garbage_corpus,  # noqa: F811
    tmp_path,
):
    data, bad = garbage_corpus
    assert garbage_steps(data, bad, 21, 2, 24) == [23]
    run_dir = tmp_path / "slurm" / "run"
    run_dir.parent.mkdir()
    t0 = time.time()
    job = slurm.sbatch(
        [
            "--nodes=2",
            f"--output={run_dir.parent}/{run_dir.name}-%j.out",
            str(SBATCH),
            *overrides(run_dir, data, *COMMON),
        ],
        env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
        cwd=REPO,
    )
    info = finish(slurm, run_dir, job)
    print(f"2-node run with a rollback: {time.time() - t0:.1f} s")
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", batch_log(run_dir, job)

    events = [r for r in rows(run_dir) if "event" in r]
    assert [(e["event"], e["step"]) for e in events] == [("spike", 23), ("rollback", 23)]
    assert (events[1]["to_step"], events[1]["skip_steps"]) == (20, [21, 23])
    got = steps(run_dir)
    assert sorted(got) == list(range(1, 25))  # every step once
    # Each node's rank said so itself (every rank logs warnings; the c10d rendezvous decides
    # which node's rank is 0).
    said = [
        re.findall(r"\[rank(\d)\] .*: step 23: loss spike .* rolled back to step 20", p.read_text())
        for p in sorted((run_dir / "logs").glob(f"node-*-{job}-r0.log"))
    ]
    assert sorted(said) == [["0"], ["1"]], node_logs(run_dir)

    # The same config on two local ranks: the same decisions and the same floats.
    local = tmp_path / "local"
    out = torchrun_train(2, overrides(local, data, *COMMON))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r for r in rows(local) if "event" in r] == events
    want = steps(local)
    for s in range(1, 25):
        for key in ("loss", "grad_norm", "lr"):
            assert got[s][key] == want[s][key], (s, key)
