"""The one place that decides device and backend, starts and stops torch.distributed, and
lets ranks agree.

CPU runs use gloo, GPU runs use NCCL (with gloo beside it for CPU tensors), chosen at run time
from the device, so the same code runs on a laptop and a cluster. torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) says whether the job is distributed.

Every decision all ranks must take together (stop, skip an overflowed step, refuse a locked
run_dir, compute in bf16) goes through `agree` (numbers, one all-reduce) or `each_rank` (any
picklable value, one all-gather): a rank that decided alone would leave its peers waiting in
the next collective until the timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than `parallel.timeout_s`: a peer rank is hung or dead."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device a rank binds to. torchrun starts one rank per GPU of the node, so rank
    LOCAL_RANK takes GPU LOCAL_RANK; a launcher that hands each task its own GPU (Slurm's
    `--gpus-per-task=1`, CUDA_VISIBLE_DEVICES per rank) leaves one visible GPU, index 0.
    Anything else would put two ranks on one GPU: refused."""
    if visible < 1:
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} but only {visible} CUDA devices are visible: launch at most "
        f"{visible} ranks per node (torchrun --nproc_per_node), or give each rank one GPU"
    )


def with_expandable_segments(alloc_conf: str | None) -> str:
    """The CUDA caching allocator's settings with `expandable_segments:True` added, unless the
    user's settings already choose it. Expandable segments let a block grow in place instead
    of leaving fixed-size segments half used, which is what fragments memory when FSDP2's
    gathered layers and the loss's chunks come and go in different sizes every step."""
    parts = [p for p in (alloc_conf or "").split(",") if p.strip()]
    if any(p.split(":", 1)[0].strip() == "expandable_segments" for p in parts):
        return ",".join(parts)
    return ",".join([*parts, "expandable_segments:True"])


def configure_cuda(tf32: bool = True) -> None:
    """Process-wide CUDA settings, before the first allocation. `tf32`: fp32 matmuls and
    convolutions run on TF32 tensor cores (10-bit mantissa, ~8x the fp32 rate on A100/H100);
    opt_train.train.flops then takes the TF32 peak for MFU. bf16/fp16 runs do not depend on it."""
    # The variable the user set, if any, else the CUDA one: torch >= 2.9 reads either name
    # (and warns that the CUDA one is deprecated), but in torch 2.9.1 the generic name alone
    # left expandable_segments off on CUDA (pytorch/pytorch#183387).
    var = next((v for v in ALLOC_CONF_VARS if v in os.environ), ALLOC_CONF_VARS[-1])
    os.environ[var] = with_expandable_segments(os.environ.get(var))
    if torch.cuda.is_initialized():
        # Too late for the variable to be read; the allocator still takes the setting (the
        # public-ish name moved in torch 2.9, the old one is kept as a deprecated alias).
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        (setter or torch.cuda.memory._set_allocator_settings)(os.environ[var])
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        configure_cuda()
        index = cuda_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def init_distributed(device_name: str, timeout_s: float, alone_too: bool = False) -> DistInfo:
    """Join the process group torchrun set up (if any). `timeout_s` bounds every collective:
    a rank that waits longer on a hung peer fails with an error instead of waiting forever.

    `alone_too`: a single process gets a one-rank gloo group over an in-memory store (no port),
    for DeepSpeed, which needs a process group even alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world == 1 and alone_too and not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        for k in ("RANK", "LOCAL_RANK"):  # DeepSpeed reads them, as torchrun would set them
            os.environ.setdefault(k, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    if world > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
            **_attempt_store(rank, world, timeout_s),
        )
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def _attempt_store(rank: int, world: int, timeout_s: float) -> dict:
    """Under torchrun, a store whose keys are private to this restart attempt.

    torch 2.13's agent keeps one store for every attempt and its workers' keys are not
    prefixed by attempt, so after a restart a new rank can read a dead rank's gloo address
    before its successor overwrites it ("Gloo connectFullMesh failed ... Connection refused":
    most single-agent restarts failed that way without the prefix, docs/benchmarks.md).
    Agents started with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 give each attempt a fresh store
    hosted by rank 0, which needs nothing."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # not torchrun, or each attempt's rank 0 hosts a fresh store of its own
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,  # the agent hosts it
        timeout=timedelta(seconds=timeout_s),
    )
    return {
        "store": dist.PrefixStore(f"opt-train/attempt_{attempt}", store),
        "rank": rank,
        "world_size": world,
    }


def _is_timeout(e: BaseException) -> bool:
    # gloo: "Timed out waiting 3000ms for recv operation to complete"; NCCL's watchdog and the
    # c10d store say "timed out" / "Timeout" too, as RuntimeError or DistError subclasses.
    msg = str(e).lower()
    if "connect" in msg:  # failing to reach a peer at start-up: the backend's words suffice
        return False
    return isinstance(e, RuntimeError) and ("timed out" in msg or "timeout" in msg)


@contextlib.contextmanager
def name_the_rank_on_timeout(rank: int, timeout_s: float) -> Iterator[None]:
    """Turn a collective's timeout into an error that says which rank gave up and why.

    The backend's own message ("Timed out waiting 600000ms for recv operation") names neither
    the rank nor the setting; in a log of hundreds of ranks that is what a user needs first."""
    try:
        yield
    except RuntimeError as e:
        if not _is_timeout(e):
            raise
        msg = (
            f"rank {rank}: a collective timed out after {timeout_s:g} s "
            f"(parallel.timeout_s): a peer rank is hung or dead. Backend said: {e}"
        )
        log.error(msg)
        raise CollectiveTimeout(msg) from e


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _peers(group: dist.ProcessGroup | None) -> bool:
    """Whether this process shares `group` with other ranks (a one-rank group, as DeepSpeed
    runs alone, has nobody to agree with)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def agree(
    values: torch.Tensor,
    op: Literal["sum", "max", "min"] = "max",
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """`values` combined element-wise over the ranks of `group` (the default group when None)
    in one all-reduce, in place, and returned: `max` of 0/1 flags says whether any rank raised
    one, `min` whether all did, `sum` adds (a mean divides by the world size; gloo has no AVG).
    Alone (no process group, or a group of one) the values are this process's own, so callers
    need no branch.
    Collective: every rank of `group` calls it with the same shape and `op`."""
    if _peers(group):
        dist.all_reduce(values, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=group)
    return values


def any_rank(
    flag: bool, device: torch.device | None = None, group: dist.ProcessGroup | None = None
) -> bool:
    """Whether `flag` is true on any rank of `group` (a failure anywhere fails everywhere).
    `device`: where the flag travels (CUDA under NCCL, CPU under gloo)."""
    return bool(agree(torch.tensor([int(flag)], device=device), "max", group).item())


def all_ranks(
    flag: bool, device: torch.device | None = None, group: dist.ProcessGroup | None = None
) -> bool:
    """Whether `flag` is true on every rank of `group`."""
    return bool(agree(torch.tensor([int(flag)], device=device), "min", group).item())


def each_rank(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's `obj` (picklable: an error text, a listing), in rank order, on every rank
    of `group`, in one all-gather; `[obj]` when alone. Collective."""
    if not _peers(group):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def shutdown(clean: bool = True) -> None:
    """Leave the process group. When `clean`, a barrier first: a rank that destroys the group
    while a peer is still in a collective can crash at exit ('terminate called without an
    active exception'; how often: docs/benchmarks.md). After a failure the barrier is
    skipped: a dead or hung peer would make it wait out the whole timeout again."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
