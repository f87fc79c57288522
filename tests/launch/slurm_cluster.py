"""A real Slurm on this machine: munged, slurmctld and one slurmd per emulated node.

Everything lives in one temporary directory (config, munge key and socket, state, spool, logs)
and listens on 127.0.0.1 only, on ports picked free at start, so two clusters on one machine do
not meet. The emulated nodes (node1, node2) share this host; Slurm reaches them by NodeAddr,
but launch scripts resolve the node names (`scontrol show hostnames` -> torchrun rendezvous
endpoint). So the daemons run in a private mount namespace whose /etc/hosts is a bind-mounted
copy that also names the nodes; job steps inherit it, and client commands enter it with
nsenter. The system /etc/hosts is never touched. Recipe and timings: ../shared/slurm-recipe.md.

`python -m tests.launch.slurm_cluster DIR` starts one and waits (Ctrl-C stops it), for
poking at by hand with `SLURM_CONF=DIR/etc/slurm.conf nsenter --mount=... sbatch ...`.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# A job in one of these states will run no more (a requeued job passes through REQUEUED and
# PENDING instead): waiting for anything else of it fails at once.
FINAL_STATES = frozenset(
    "COMPLETED CANCELLED FAILED TIMEOUT NODE_FAIL PREEMPTED BOOT_FAIL DEADLINE OUT_OF_MEMORY".split()
)

# Binaries the cluster needs; CI installs them with .ci/install-slurm.
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")

CONF = """\
ClusterName=optci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long (default 120 s) before it may start again.
AuthInfo=socket={d}/msock/munge.socket.2,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmdDebug=verbose
# Listen on 127.0.0.1 only (NoInAddrAny alone still left slurmctld on 0.0.0.0).
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout={slurmd_timeout}
InactiveLimit=0
# A random first job id: the launch script derives the rendezvous port from the job id, and
# clusters of concurrent test runs on this machine must not hand out the same ports.
FirstJobId={first_job_id}
{nodes}
PartitionName=debug Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP
"""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(
        self,
        root: Path,
        nodes: tuple[str, ...] = ("node1", "node2"),
        cpus: int = 2,
        slurmd_timeout: int = 30,
    ):
        self.d = Path(root)
        self.nodes = nodes
        self.cpus = cpus
        self.slurmd_timeout = slurmd_timeout
        self.conf = self.d / "etc" / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}  # name -> daemon (or namespace holder)
        self._logs: list = []

    # -- start and stop ---------------------------------------------------------------------

    def start(self, timeout: float = 30) -> SlurmCluster:
        missing = missing_tools()
        if missing:
            raise RuntimeError(
                f"Slurm/munge not installed (missing {', '.join(missing)}); run .ci/install-slurm"
            )
        d = self.d
        for sub in ("etc", "state", "spool", "log", "run", "mkey", "msock"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket directory that is not world-executable; the key stays 0700.
        os.chmod(d, 0o755)
        os.chmod(d / "msock", 0o755)
        os.chmod(d / "mkey", 0o700)
        subprocess.run(
            ["mungekey", "--create", "--force", f"--keyfile={d}/mkey/munge.key"],
            check=True,
            capture_output=True,
        )
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 "
            f"Port={free_port()} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
            for n in self.nodes
        )
        self.conf.write_text(
            CONF.format(
                d=d,
                ctld_port=free_port(),
                slurmd_port=free_port(),
                slurmd_timeout=self.slurmd_timeout,
                # Not the global `random`: tests that train in the worker seed it, and two
                # workers' clusters once drew the same first id, so both ran a job with the
                # same id, whose rendezvous port (train.sbatch: 20000 + id % 10000) the other
                # already held on this one host (EADDRINUSE).
                first_job_id=random.SystemRandom().randint(1000, 60_000_000),
                nodes=node_lines,
                nodelist=",".join(self.nodes),
            )
        )
        hosts = Path("/etc/hosts").read_text()
        (d / "etc" / "hosts").write_text(hosts + f"\n127.0.0.1 {' '.join(self.nodes)}\n")

        # The namespace holder: a private mount namespace with our /etc/hosts, kept alive so
        # that every daemon and client command can enter it.
        self._spawn(
            "ns",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount --bind {d}/etc/hosts /etc/hosts && exec sleep 2147483647",
            ],
            enter_ns=False,
        )
        self._wait(lambda: self._ns_ready(), 10, "mount namespace")
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                f"--socket={d}/msock/munge.socket.2",
                f"--key-file={d}/mkey/munge.key",
                f"--log-file={d}/log/munged.log",
                f"--pid-file={d}/msock/munged.pid",
                f"--seed-file={d}/mkey/munged.seed",
            ],
        )
        self._wait(lambda: (d / "msock" / "munge.socket.2").exists(), 10, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for n in self.nodes:
            self.start_node(n)
        self.wait_idle(timeout)
        return self

    def start_node(self, name: str) -> None:
        self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])

    def wait_idle(self, timeout: float = 30) -> None:
        """Until every node is idle (registered, no job)."""

        def idle():
            r = self.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False)
            return len(r.stdout.split()) == len(self.nodes)

        self._wait(idle, timeout, "all nodes idle")

    def stop(self) -> None:
        """Cancel every job, let step daemons finish, then stop the daemons by PID.
        Safe to call on a half-started cluster and more than once."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user=root"], check=False, timeout=10)
            deadline = time.time() + 15
            while time.time() < deadline and self._step_sockets():
                time.sleep(0.2)
        self._kill_job_processes()
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged", "ns"]
        for name in order:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
        for name in order:
            p = self.procs.get(name)
            if p is None:
                continue
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients ----------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def ns_prefix(self, cwd: Path | str | None = None) -> list[str]:
        # Entering a mount namespace resets the working directory to /; --wd restores it.
        wd = os.path.abspath(cwd or os.getcwd())
        return ["nsenter", f"--mount=/proc/{self.procs['ns'].pid}/ns/mnt", f"--wd={wd}", "--"]

    def run(
        self,
        cmd: list[str],
        check: bool = True,
        env: dict[str, str] | None = None,
        cwd: Path | str | None = None,
        timeout: float = 30,
    ) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, ...) inside the cluster's mount namespace."""
        r = subprocess.run(
            self.ns_prefix(cwd) + cmd,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
        return r

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd=None) -> str:
        r = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        r = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        out: dict[str, str] = {}
        for field in r.stdout.split():
            k, _, v = field.partition("=")
            out.setdefault(k, v)
        return out

    def array_states(self, array_job_id: str) -> dict[str, str]:
        r = self.run(["squeue", "-h", "-r", "-t", "all", "-j", array_job_id, "-o", "%i %T"])
        return dict(line.split() for line in r.stdout.splitlines() if line.strip())

    def wait_job(
        self, job_id: str, states=("COMPLETED",), timeout: float = 120, poll: float = 0.5
    ) -> dict[str, str]:
        """Until the job reaches one of `states`; fails early when it ends in another state."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended {state}, waiting for {states}:\n{info}")
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {info}")

    def wait_steps_gone(self, job_id: str, timeout: float = 30) -> None:
        """Until no step daemon of `job_id` is left on any node (its processes have ended)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            # Step sockets are named <node>_<job>.<step>.
            left = [
                p for p in self._step_sockets() if p.name.rsplit("_", 1)[-1].split(".")[0] == job_id
            ]
            if not left:
                return
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id}: step daemons still running after {timeout} s")

    # -- faults -----------------------------------------------------------------------------

    def kill_node(self, name: str) -> list[int]:
        """What a crashed machine looks like to Slurm: its slurmd, its step daemons and its
        tasks die at once (SIGKILL). Returns the PIDs killed."""
        p = self.procs.pop(f"slurmd-{name}")
        victims = [p.pid] + [pid for pid in _pids() if pid != p.pid and self._node_of(pid) == name]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
        return victims

    # -- internals --------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], enter_ns: bool = True) -> None:
        log = open(self.d / "log" / f"{name}.out", "ab")
        self._logs.append(log)
        prefix = self.ns_prefix() if enter_ns else []
        # nsenter execs the daemon, so the PID we hold is the daemon's own.
        self.procs[name] = subprocess.Popen(
            prefix + cmd,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _ns_ready(self) -> bool:
        ns = self.procs["ns"]
        if ns.poll() is not None:
            raise RuntimeError(f"unshare failed: {(self.d / 'log' / 'ns.out').read_text()}")
        r = subprocess.run(
            ["nsenter", f"--mount=/proc/{ns.pid}/ns/mnt", "--", "getent", "hosts", self.nodes[0]],
            capture_output=True,
        )
        return r.returncode == 0

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    log = (self.d / "log" / f"{name}.out").read_text(errors="replace")
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting: {log}")
            if cond():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{what}: not ready after {timeout} s; logs in {self.d / 'log'}")

    def _step_sockets(self) -> list[Path]:
        return [p for p in (self.d / "spool").glob("*/*_[0-9]*") if p.is_socket()]

    def _node_of(self, pid: int) -> str | None:
        """The emulated node a process belongs to: tasks carry SLURMD_NODENAME in their
        environment; a step daemon has its node's spool directory open (or as cwd)."""
        proc = Path(f"/proc/{pid}")
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            if f"SLURM_CONF={self.conf}".encode() in env:
                for kv in env:
                    if kv.startswith(b"SLURMD_NODENAME="):
                        return kv.split(b"=", 1)[1].decode()
            if (proc / "comm").read_text().strip() == "slurmstepd":
                spool = self.d / "spool"
                for link in [proc / "cwd", *(proc / "fd").iterdir()]:
                    target = os.readlink(link)
                    if target.startswith(f"{spool}/"):
                        return Path(target).relative_to(spool).parts[0]
        except (OSError, ValueError):
            return None
        return None

    def _kill_job_processes(self) -> None:
        """Last resort after scancel: anything still running with this cluster's config in
        its environment or as one of its step daemons (found by PID, never by name)."""
        for pid in _pids():
            if pid == os.getpid() or any(p.pid == pid for p in self.procs.values()):
                continue
            if self._node_of(pid) is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-dev")
    cluster = SlurmCluster(root)
    t0 = time.time()
    with cluster:
        print(f"up in {time.time() - t0:.1f} s")
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"prefix: {' '.join(cluster.ns_prefix())}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
