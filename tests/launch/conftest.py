"""A real two-node Slurm for the launch tests, started per test module (about 1.3 s) and stopped
by PID when the module is done, so no daemon outlives the tests that use it.

The tests fail (never skip) when Slurm is not installed: CI installs it with .ci/install-slurm.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import SlurmCluster


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: runs jobs on a real slurmctld + two slurmd that the tests start"
    )


@pytest.fixture(scope="module")
def slurm():
    # Not under pytest's tmp_path: its parents are 0700, and munged needs a world-executable
    # path to its socket directory. mkdtemp gives a fresh, private name each time.
    root = Path(tempfile.mkdtemp(prefix="opt-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("KEEP_SLURM_DIR") != "1":  # keep configs and daemon logs to debug
            shutil.rmtree(root, ignore_errors=True)
