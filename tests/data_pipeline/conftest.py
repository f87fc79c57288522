from __future__ import annotations

import sys

import pytest

from data_pipeline.scaleout import RayOptions, ScaleOut, connect_ray


@pytest.fixture(scope="session")
def local_ray() -> RayOptions:
    """A real Ray on this machine, started the way `executor=ray` starts one (2 CPUs, a small
    object store: the tasks pass it only the pickled step), shared by the Ray tests and shut
    down after them. The stages then run on it: a connected process keeps its Ray."""
    opts = RayOptions(num_cpus=2, object_store_mb=200, mem_per_cpu_gb=0.5)
    connect_ray(ScaleOut(executor="ray", ray=opts))
    yield opts
    sys.modules["ray"].shutdown()
