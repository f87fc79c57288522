import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest

# Tests run on CPU with a couple of threads: the machines have 2 cores, and a fixed thread
# count keeps floating-point reductions reproducible between runs. PASSIVE: an idle OpenMP
# thread sleeps instead of spinning. Two xdist workers share the 2 cores, and spinning threads
# took a core from the other worker: the spike-recovery test in-process took 38 s of CPU
# (43 s wall) beside a busy core with the default policy, 21 s (27 s) with PASSIVE, and 22 s
# wall with PASSIVE on an idle machine (docs/benchmarks.md, "The test suite").
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def trainer_left_behind_is_undone():
    """After each test, what `train` undoes at its end, for the tests that run a Trainer in this
    process and stop at `fit()` without `close()`: its preemption handlers (SIGTERM, SIGUSR1,
    ... and SIGINT) and its run locks. Left installed, a later test's forked process (the data
    pipeline's local executor forks) inherited the handlers and ignored the SIGTERM that ends
    it, and its pytest worker then waited for it forever at exit (docs/benchmarks.md)."""
    import signal

    from opt_train.train.run_lock import release_run_locks
    from opt_train.train.signals import PREEMPTION_SIGNALS

    signals = (*PREEMPTION_SIGNALS, signal.SIGINT)
    before = {sig: signal.getsignal(sig) for sig in signals}
    yield
    release_run_locks()
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def opt_tokenizer_dir() -> Path:
    """OPT's real vocab.json/merges.txt from ../shared (not part of the project)."""
    d = Path(os.environ.get("OPT_TOKENIZER_DIR", REPO.parent / "shared" / "opt-tokenizer"))
    if not (d / "vocab.json").is_file():
        pytest.fail(f"OPT tokenizer files not found at {d}; set OPT_TOKENIZER_DIR")
    return d


@pytest.fixture(scope="session")
def garbage_corpus(tmp_path_factory) -> tuple[Path, set[int]]:
    """The spike-recovery corpus (tests/opt_train/garbage.py): (shards, garbage windows)."""
    from tests.opt_train.garbage import build_garbage_corpus

    return build_garbage_corpus(tmp_path_factory.mktemp("garbage"))


@pytest.fixture(scope="session")
def two_rank_rollback(garbage_corpus, tmp_path_factory):
    """`run(mesh)`: the run_dir of a 2-rank run with stability on over the garbage corpus
    (tests/opt_train/garbage.py's TWO_RANKS with `mesh`; `train_on_ranks`), run once a
    session. The replay-by-hand test, the provenance test and the two-node Slurm test (whose
    ranks torchrun starts on each node) compare against it."""
    from tests.opt_train.conftest import train_on_ranks
    from tests.opt_train.garbage import STABLE, TWO_RANKS, overrides

    runs: dict[str, Path] = {}

    def run(mesh: str) -> Path:
        if mesh not in runs:
            run_dir = tmp_path_factory.mktemp("rollback") / "auto"
            data, _ = garbage_corpus
            train_on_ranks(2, overrides(run_dir, data, *TWO_RANKS, mesh, *STABLE))
            runs[mesh] = run_dir
        return runs[mesh]

    return run


@pytest.fixture(scope="session")
def tiny_corpus_cache(tmp_path_factory) -> Path:
    """A `data.cache_dir` holding the embedded tiny corpus (`<cache>/tiny-corpus`), built once a
    session for the tests that read it. The tests of a build itself (deterministic, built once
    under concurrency, its log line, `torchrun` on a fresh cache) build their own."""
    from data_pipeline.tiny_corpus import build_tiny_shards

    cache = tmp_path_factory.mktemp("cache")
    build_tiny_shards(cache / "tiny-corpus")
    return cache


# Session fixtures that cost a run each: under pytest-xdist every worker would build its own,
# so the tests that use one are sent to the same worker (`--dist loadgroup`, pyproject.toml).
SHARED_RUNS = {
    "fp32_mesh_run": "fp32_mesh",
    "two_rank_rollback": "rollback",
    "local_ray": "ray",
    "tiny_corpus_cache": "tiny_corpus",
}
# Module fixtures that cost a run, the same way: xdist hands out tests one by one, so the tests
# of one module that share one would otherwise build it once in each worker (the FSDP2
# `reference` was built twice per suite, 14 s and 15 s, before this).
MODULE_RUNS = {"reference", "zero3_reference", "offload_run", "whole_run", "eval_run"}


# The first work unit of each of the three workers: groups whose tests never run the numba
# kernels (their data is written with numpy), so the workers train while the controller's
# warm-up compiles the kernels. Before, every worker's first unit read JSONL, and all three
# waited for the single-threaded line-parser compile with one core idle (~30 s at ~55% of the
# cores at the start of each suite; docs/benchmarks.md, "The test suite").
RUN_FIRST = ("test_fault_tolerance.reference", "test_train_sbatch.whole_run", "fp32_mesh")


def xdist_group(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    return marker.args[0] if marker else None


# tryfirst: xdist's own hook turns the markers into the `@group` suffix its scheduler reads, so
# a marker added after it is ignored and each worker builds the fixture again (checked with a
# module fixture that logs its builds: two workers, two builds without tryfirst, one with it).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = next((g for f, g in SHARED_RUNS.items() if f in item.fixturenames), None)
        if group is None:
            shared = sorted(MODULE_RUNS.intersection(item.fixturenames))
            group = f"{item.path.stem}.{shared[0]}" if shared else None
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if hasattr(config, "workerinput"):
        # xdist hands out work in this order (`--no-loadscope-reorder`, pyproject.toml), the
        # same in every worker: RUN_FIRST, then what xdist's own reordering gave (the groups,
        # larger first, then the single tests in collection order). Slow single tests first was
        # tried twice and made no suite faster (docs/benchmarks.md, "The test suite").
        size = Counter(xdist_group(item) for item in items)
        first = {}
        for i, item in enumerate(items):
            first.setdefault(xdist_group(item), i)

        def rank(item: pytest.Item) -> tuple[int, int, int]:
            group = xdist_group(item)
            if group in RUN_FIRST:
                return 0, RUN_FIRST.index(group), 0
            return (1, -size[group], first[group]) if group is not None else (2, 0, 0)

        items.sort(key=rank)  # stable: collection order within each rank


def warm_numba_kernels(part: str) -> None:
    """Compile (or load from numba's cache) the data_pipeline kernels for the argument types
    and MinHash variants the stages pass (numba keys compiled code on the types; input buffers
    are always handed over read-only, kernels/scratch.py's `read_only`). Two parts, compiled
    by two processes at once: "jsonl" (the line parser) and "minhash" (hashing and LSH)."""
    import numpy as np

    from data_pipeline.kernels.jsonl_scan import count_newlines, parse_block
    from data_pipeline.kernels.minhash import _LIBCRYPTO, SCHEMES, MinHasher
    from data_pipeline.stages.dedup.stage import warm_up_hashing

    if part == "jsonl":
        line = b'{"text": "a", "id": "0", "meta": {"k": 1}, "x": [1.5, null]}\n'
        parse_block(line)
        count_newlines(line, len(line))
        return
    # What data_pipeline.stages.dedup.stage._warm_up runs after parsing, for each variant.
    words = b"warm up the compiled kernels"  # writable, 64 bytes to spare: as parse_block gives
    text = np.frombuffer(words + bytes(64), np.uint8).copy()
    offsets = np.array([0, len(words)], dtype=np.int64)
    for scheme in SCHEMES:
        for backend in ["simd", "openssl"] if _LIBCRYPTO else ["simd"]:
            warm_up_hashing(MinHasher(scheme=scheme, backend=backend), (16, 8), text, offsets)


# The workers wait for the warm-up at their first test that may need the kernels, not at start:
# xdist starts them while it compiles, so their collection (~10 s of CPU each) and their
# RUN_FIRST groups overlap with it.
WARM_LOCK_ENV = "OPT_TRAIN_TESTS_NUMBA_WARM_LOCK"


def compile_project_sources() -> None:
    """Write the bytecode of the project's own modules (and of train.py and the tests' helpers)
    into their `__pycache__` directories (git ignores them), once, before any worker or
    subprocess starts. Where the environment sets PYTHONDONTWRITEBYTECODE (the CI machines do),
    Python never writes it, so every interpreter the suite starts that imports the project
    (some 200: torchrun's and train.py's ranks, Slurm array tasks, Ray workers, stage
    commands) compiled its modules from source again: ~0.2 s of CPU per training rank
    (docs/benchmarks.md, "The test suite"). Reading bytecode is allowed under that setting;
    site-packages has its own from pip. compileall skips files whose bytecode is current; it
    prints nothing (a read-only checkout just goes without; pytest reports syntax errors)."""
    import compileall

    for package in ("opt_train", "data_pipeline", "tests", "benchmarks"):
        compileall.compile_dir(REPO / package, quiet=2)
    compileall.compile_file(REPO / "train.py", quiet=2)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the project's sources (`compile_project_sources`), then, under pytest-xdist,
    compile numba's kernels once, in children of the controller, while
    the workers start: each worker would otherwise compile the same kernels into the same
    cache, ~45 s of CPU each on a clean checkout (docs/benchmarks.md, "The test suite"). The
    controller holds an exclusive lock on a file until the compiles end; each worker takes it
    shared before its first test that may need them (`pytest_runtest_setup`). With the cache
    warm this costs ~1 s."""
    config = session.config
    if hasattr(config, "workerinput"):
        return
    compile_project_sources()
    if not getattr(config.option, "numprocesses", None):
        return
    lock_dir = Path(tempfile.mkdtemp(prefix="opt-train-numba-warm-"))
    lock = open(lock_dir / "lock", "w")  # closed by the thread that waits for the compiles
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.environ[WARM_LOCK_ENV] = str(lock_dir / "lock")  # the workers xdist starts next inherit it
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", f"import tests.conftest as c; c.warm_numba_kernels({part!r})"],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for part in ("jsonl", "minhash")
    ]
    failures: list[str] = []

    def wait_and_release() -> None:
        try:
            errors = [p.communicate(timeout=600)[1] for p in procs]
            failures.extend(e[-3000:] for p, e in zip(procs, errors, strict=True) if p.returncode)
        except subprocess.TimeoutExpired:
            failures.append("did not finish within 600 s")
        finally:
            for p in procs:
                p.kill()  # no-op once it has exited
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    thread = threading.Thread(target=wait_and_release, name="numba-warm-up", daemon=True)
    thread.start()
    config.stash[_WARM_UP] = (thread, failures, lock_dir)


_WARM_UP = pytest.StashKey[tuple]()


_kernels_warm = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """In an xdist worker, before the first test that may run the numba kernels (all but
    RUN_FIRST's), its fixtures included: wait until the controller's warm-up has ended."""
    global _kernels_warm
    if _kernels_warm or xdist_group(item) in RUN_FIRST:
        return
    path = os.environ.get(WARM_LOCK_ENV)
    if path and os.path.exists(path):
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_SH)  # blocks while the controller holds it exclusively
    _kernels_warm = True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The controller: a failed warm-up fails the run (the tests that needed the kernels
    compiled them themselves, and may have passed)."""
    warm = session.config.stash.get(_WARM_UP, None)
    if warm is None:
        return
    thread, failures, lock_dir = warm
    thread.join()
    shutil.rmtree(lock_dir, ignore_errors=True)
    if failures:
        sys.stderr.write("compiling the numba kernels failed:\n" + "\n".join(failures) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
