"""The pipeline stages' progress reporter: plain lines in a log, a tqdm bar on a terminal."""

import fcntl
import io
import os
import pty
import select
import struct
import termios

import pytest

from data_pipeline.runtime.progress import Progress, format_count


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_in_a_log_it_prints_a_line_per_interval_with_rate_and_eta_and_a_final_line():
    clock, out = Clock(), io.StringIO()
    with Progress("clean", total=1000, unit="doc", stream=out, interval_s=30, clock=clock) as p:
        assert p.mode == "lines"  # a StringIO is not a terminal
        for _ in range(10):  # 100 docs every 10 s
            clock.t += 10
            p.update(100)
    lines = out.getvalue().splitlines()
    assert lines == [
        # at 30 s: 300 docs, 10 docs/s, 700 left -> 70 s
        "clean: 300/1,000 docs (30.0%) | 10 docs/s | ETA 0:01:10 | elapsed 0:00:30",
        "clean: 600/1,000 docs (60.0%) | 10 docs/s | ETA 0:00:40 | elapsed 0:01:00",
        "clean: 900/1,000 docs (90.0%) | 10 docs/s | ETA 0:00:10 | elapsed 0:01:30",
        "clean: done, 1,000 docs in 0:01:40 (10 docs/s)",
    ]
    assert "\r" not in out.getvalue()


def test_bytes_are_scaled_and_an_unknown_total_has_no_eta():
    clock, out = Clock(), io.StringIO()
    p = Progress("tokenize", unit="B", stream=out, interval_s=5, clock=clock)
    clock.t += 5
    p.update(3 * 2**30)
    p.close()
    p.close()  # closing twice prints once
    assert out.getvalue().splitlines() == [
        "tokenize: 3.00 GiB | 614.40 MiB/s | elapsed 0:00:05",
        "tokenize: done, 3.00 GiB in 0:00:05 (614.40 MiB/s)",
    ]
    assert format_count(512, "B") == "512 B" and format_count(1536, "B") == "1.50 KiB"


def test_disabled_prints_nothing_but_still_counts():
    out = io.StringIO()
    with Progress("dedup", total=10, stream=out, interval_s=0, enabled=False) as p:
        p.update(10)
    assert out.getvalue() == "" and p.n == 10


def test_on_a_terminal_it_is_a_tqdm_bar():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    tty = os.fdopen(slave, "w")
    try:
        with Progress("reddit", total=4, unit="doc", stream=tty) as p:
            assert p.mode == "bar"
            p.update(4)
        tty.flush()
        chunks = []
        while select.select([master], [], [], 0.5)[0]:
            chunks.append(os.read(master, 1 << 16))
    finally:
        tty.close()
        os.close(master)
    out = b"".join(chunks).decode()
    assert "\rreddit: 100%" in out and "4/4" in out and "doc/s" in out


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="auto, bar or lines"):
        Progress("x", mode="fancy")
