"""Starting real processes from tests and ending every one of them, whatever the test does.

torchrun starts each worker in a session of its own (torch's SubprocessHandler passes
`start_new_session=True`), so killing torchrun's process group misses the workers; a worker
left behind waits in a collective for its dead peers and holds the machine's 2 cores.
`kill_tree` therefore collects the descendants first and kills each one, plus the group."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def descendants(pid: int) -> list[int]:
    found = []
    for c in children(pid):
        found += [c, *descendants(c)]
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`, its process group when it leads one, and every descendant: what a dead
    node does to a job. The tree is read before any kill, since a killed parent's children are
    re-parented to init and can no longer be found."""
    tree = descendants(pid)
    for target in (pid, *tree):
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def started(cmd: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    """`subprocess.Popen(cmd, **popen_kwargs)` in a new session, ended on the way out (pass,
    fail or pytest-timeout): whatever of it is still alive is killed and reaped."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        else:
            try:  # torchrun gone, its workers (own sessions) may not be; its group may linger
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def run(cmd: list[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`, except that
    past the timeout the whole tree is killed (subprocess.run kills only its direct child,
    which for torchrun leaves the workers running)."""
    with started(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs
    ) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
