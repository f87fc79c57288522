from __future__ import annotations

import sys

import pytest

from data_pipeline.runtime.executors import connect_ray
from data_pipeline.runtime.scaleout import RayOptions, ScaleOut


@pytest.fixture(scope="session")
def local_ray() -> RayOptions:
    """A real Ray on this machine, started the way `executor=ray` starts one (2 CPUs, a small
    object store: the tasks pass it only the pickled step), shared by the Ray tests and shut
    down after them. The stages then run on it: a connected process keeps its Ray."""
    opts = RayOptions(num_cpus=2, object_store_mb=200, mem_per_cpu_gb=0.5)
    connect_ray(ScaleOut(executor="ray", ray=opts))
    yield opts
    sys.modules["ray"].shutdown()


def stage_processes(pgid: int) -> list[int]:
    """Live processes (zombies excluded: they run nothing) of the process group `pgid`: a stage
    driver started with start_new_session=True and everything it forked or spawned."""
    import os

    import psutil

    left = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return left


def assert_no_stage_processes(pgid: int, within_s: float = 5.0) -> None:
    """Within `within_s` of its driver's death, no process of the stage runs any more."""
    import os
    import signal
    import time

    deadline = time.monotonic() + within_s
    while (left := stage_processes(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:  # the failure is reported; the suite must not leak them either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed stage still alive: {left}"
