"""Launching several real gloo ranks from a test, on free loopback ports.

`torchrun_train` runs the real `torchrun ... train.py` (what users run); `spawn` runs a
function on N ranks forked from a server process that has imported torch and the trainer,
with a process group already initialised (for unit-level checks) or with torchrun's
environment for the function to join one itself (tests/opt_train/conftest.py's
`train_on_ranks`); `forked` does the same with the test's own code running beside the ranks.
Each ends every process it started, even when the test fails or times out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch.multiprocessing as mp

from tests.processes import run

REPO = Path(__file__).resolve().parents[1]

# The tiny run the multi-rank tests launch: a 2-layer, 32-wide OPT over a 512-token
# vocabulary without dropout, two sequences of 32 per micro-batch, 256 tokens a step (a step
# takes ~0.1 s on two CPU ranks). Each test adds its precision, step count and intervals.
TINY_RUN = [
    "model.vocab_size=512",
    "model.d_model=32",
    "model.n_heads=4",
    "model.dropout=0.0",
    "model.attention_dropout=0.0",
    "data.seq_len=32",
    "train.micro_batch_size=2",
    "train.batch_tokens=256",
    "logging.wandb=disabled",
    "logging.progress=false",
    "logging.peak_tflops=1.0",
    "optim.lr=0.01",
    "optim.warmup_tokens=512",
    "optim.decay_tokens=8192",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(threads: int = 1) -> dict[str, str]:
    """Environment for rank processes: one thread each (2 cores, up to 4 ranks) and no wandb."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    return env


def torchrun_cmd(
    nproc: int, overrides: list[str], extra_args: list[str] | None = None
) -> list[str]:
    """The real `torchrun ... train.py` command line, on a free loopback port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *(extra_args or []),
        "train.py",
        *overrides,
    ]


def torchrun_train(
    nproc: int, overrides: list[str], timeout: float = 300, extra_args: list[str] | None = None
) -> subprocess.CompletedProcess:
    """Run torchrun to the end; past `timeout` (TimeoutExpired) torchrun and its workers are
    killed."""
    return run(torchrun_cmd(nproc, overrides, extra_args), timeout, cwd=REPO, env=rank_env())


def _entry(rank: int, world: int, port: int, fn, args, errors, join_group: bool) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(1)
    # What train.py's ranks print (opt_train/launch.py): warnings and errors, labelled (at
    # the handler, so a test that lowers a logger's level to read INFO prints no more).
    printed = logging.StreamHandler()
    printed.setLevel(logging.WARNING)
    printed.setFormatter(logging.Formatter(f"[rank{rank}] %(name)s: %(message)s"))
    logging.getLogger().addHandler(printed)
    if join_group:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if join_group:
            dist.barrier()
            dist.destroy_process_group()


# Ranks are forked from a server process (one per test worker, started at the first `spawn`)
# that imported torch, the trainer and torch._dynamo (which FSDP2 and DTensor import at first
# use) once; started as fresh interpreters, each rank imported them again (~3.5 s of CPU on
# these machines). The server is a fresh interpreter itself, so the ranks inherit nothing of
# the test process (signal handlers, locks, threads), as with "spawn".
mp.set_forkserver_preload(
    ["tests.multirank", "tests.opt_train.conftest", "opt_train.train.trainer", "torch._dynamo"]
)


def spawn(fn, world: int, *args, timeout: float = 300, join_group: bool = True) -> None:
    """Run `fn(rank, world, *args)` on `world` gloo ranks; re-raise the first rank's failure.
    `fn` must be importable (a module-level function). Ranks still alive `timeout` seconds
    after the start (a rank hung in a collective whose peer failed) are killed and named.
    With `join_group=False` the ranks get torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) and `fn` joins the group itself, as the trainer does."""
    with forked(fn, world, *args, timeout=timeout, join_group=join_group):
        pass


@contextlib.contextmanager
def forked(
    fn, world: int, *args, timeout: float = 300, join_group: bool = True
) -> Iterator[list[BaseProcess]]:
    """`spawn` with the test running beside its ranks: yields the started processes, rank r
    at index r (the test may signal one: SIGSTOP), then waits for them and checks them as
    `spawn` does; `timeout` counts from the start, the test's own code included. When the
    test's code fails, the ranks are killed and its error stands, raised from the first rank's
    failure when one failed (a rank that died is why a test waiting for it gave up)."""
    ctx = mp.get_context("forkserver")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, fn, args, errors, join_group))
        for r in range(world)
    ]
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            p.start()
        try:
            yield procs
        except BaseException as e:  # the ranks are killed below, in `finally`
            if not errors.empty():
                raise AssertionError(errors.get()) from e
            raise
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
    finally:
        for p in procs:  # also on the test's failure, KeyboardInterrupt or pytest-timeout
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join()
    if not errors.empty():
        raise AssertionError(errors.get())
    if hung:
        raise AssertionError(f"ranks {hung} were still running after {timeout} s; killed")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with {bad}")
