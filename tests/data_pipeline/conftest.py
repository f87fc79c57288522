from __future__ import annotations

import sys

import pytest

from data_pipeline.runtime.executors import connect_ray
from data_pipeline.runtime.scaleout import RayOptions, ScaleOut

_ray: RayOptions | None = None


@pytest.fixture
def local_ray() -> RayOptions:
    """A real Ray on this machine, started the way `executor=ray` starts one (2 CPUs, a small
    object store: the tasks pass it only the pickled step), shared by the Ray tests. The stages
    then run on it: a connected process keeps its Ray. Started by the first Ray test and shut
    down after the last of a row of them (`pytest_runtest_teardown`; the "ray" xdist group,
    tests/conftest.py, keeps them in one row), not at the end of the session: its daemons took
    ~3% of a core while up, ~24 s of CPU over a whole suite (docs/benchmarks.md)."""
    global _ray
    if _ray is None:
        opts = RayOptions(num_cpus=2, object_store_mb=200, mem_per_cpu_gb=0.5)
        connect_ray(ScaleOut(executor="ray", ray=opts))
        _ray = opts
    return _ray


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    global _ray
    if _ray is not None and (nextitem is None or "local_ray" not in nextitem.fixturenames):
        sys.modules["ray"].shutdown()
        _ray = None


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
