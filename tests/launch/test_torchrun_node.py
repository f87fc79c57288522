"""torchrun-node.sh's choices, without Slurm: processes per node and the torchrun command."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "slurm" / "torchrun-node.sh"


def launch(tmp_path: Path, gpus_in_nvidia_smi: int | None = None, **env: str) -> list[str]:
    """The arguments torchrun-node.sh hands to $PYTHON (a stub that prints them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python-stub"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "$ARGS_OUT"\n')
    stub.chmod(0o755)
    if gpus_in_nvidia_smi is not None:
        smi = bin_dir / "nvidia-smi"
        lines = "".join(
            f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})\\n" for i in range(gpus_in_nvidia_smi)
        )
        smi.write_text(f'#!/bin/sh\nprintf "{lines}"\n')
        smi.chmod(0o755)
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHON": str(stub),
        "ARGS_OUT": str(tmp_path / "args"),
        "LOG_DIR": str(tmp_path / "logs"),
        "RDZV_HOST": "node1",
        "RDZV_PORT": "21234",
        "RDZV_ID": "1234-0",
        "CKPT_GRACE_S": "100",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_ID": "1234",
        "SLURMD_NODENAME": "node2",
        **env,
    }
    (tmp_path / "logs").mkdir(exist_ok=True)
    r = subprocess.run([str(SCRIPT), "train.py", "run_dir=/r", "a.b='x y'"], env=full_env)
    assert r.returncode == 0
    return (tmp_path / "args").read_text().splitlines()


def nproc(args: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith("--nproc-per-node="))


def test_torchrun_command_rendezvous_signals_and_overrides(tmp_path):
    args = launch(tmp_path)
    assert args[:2] == ["-m", "torch.distributed.run"]
    assert "--nnodes=2" in args and "--rdzv-backend=c10d" in args
    assert "--rdzv-endpoint=node1:21234" in args and "--rdzv-id=1234-0" in args
    assert "--rdzv-conf=is_host=0" in args  # node id 1 does not host the rendezvous
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in args
    assert "--shutdown-timeout=100" in args
    assert args[-3:] == ["train.py", "run_dir=/r", "a.b='x y'"]  # passed through unchanged
    log = (tmp_path / "logs" / "node-node2-1234-r0.log").read_text()
    assert "node=node2" in log


@pytest.mark.parametrize(
    "env, smi, want",
    [
        ({}, None, "1"),  # a CPU node
        ({}, 4, "4"),  # every GPU nvidia-smi lists
        ({"SLURM_GPUS_ON_NODE": "2"}, 4, "2"),  # the job's allocation before the hardware
        ({"GPUS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "2"}, 4, "3"),  # the user's choice first
    ],
)
def test_processes_per_node(tmp_path, env, smi, want):
    assert nproc(launch(tmp_path, smi, **env)) == want


def test_first_node_hosts_the_rendezvous(tmp_path):
    assert "--rdzv-conf=is_host=1" in launch(tmp_path, SLURM_NODEID="0")
    assert os.access(SCRIPT, os.X_OK)
