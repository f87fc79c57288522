"""The signature step's input cut into blocks of whole lines, in input order, each block one
call of the signature parser; too-long lines and truncated files become rejects on the way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.documents import (
    TRUNCATED_ERRORS,
    InputLimits,
    TooLong,
    iter_lines,
    too_long_reason,
    truncated_reason,
)
from data_pipeline.kernels.jsonl_scan import count_newlines


def line_tasks(
    files: list[Path], size: int, zstd: bool, progress, limits: InputLimits
) -> Iterator[tuple]:
    """Blocks for the signature parser: (file, number of its first line, a block of whole
    lines, reject, zstd) with about `size` bytes of one file. A compressed file is read as
    documents.iter_lines reads it (bounded reads; a line longer than `limits.max_line_bytes`
    is streamed past): a too-long line, or a truncation (at the line after the last complete
    one, as documents.iter_json_lines reports it), is a block with no lines carrying its
    reject (line, reason, raw, length), so rejects reach the rejects file in input order."""
    for path in files:
        if path.suffix not in (".gz", ".zst"):
            yield from _plain_tasks(path, size, zstd, progress, limits)
            continue
        lineno, acc, n = 0, [], 0  # lines sent so far; the lines of the next block
        lines = iter_lines(path, progress, limits.max_line_bytes, limits.reject_text_bytes)
        try:
            for line in lines:
                if type(line) is TooLong:
                    if acc:
                        yield str(path), lineno + 1, b"".join(acc), None, zstd
                        lineno, acc, n = lineno + len(acc), [], 0
                    lineno += 1
                    reason = too_long_reason(limits.max_line_bytes)
                    yield str(path), lineno, b"", (lineno, reason, line.head, line.length), zstd
                    continue
                acc.append(line)
                n += len(line)
                if n >= size:
                    yield str(path), lineno + 1, b"".join(acc), None, zstd
                    lineno, acc, n = lineno + len(acc), [], 0
        except TRUNCATED_ERRORS as e:
            if acc:
                yield str(path), lineno + 1, b"".join(acc), None, zstd
                lineno += len(acc)
            yield str(path), lineno + 1, b"", (lineno + 1, truncated_reason(e), b"", None), zstd
            continue
        if acc:
            yield str(path), lineno + 1, b"".join(acc), None, zstd


def _plain_tasks(
    path: Path, size: int, zstd: bool, progress, limits: InputLimits
) -> Iterator[tuple]:
    """Blocks of an uncompressed file: (file, first line, (offset, length) of a block of whole
    lines, None, zstd). The parser reads the block itself, straight into its reused buffer
    (no bytes object per block); here the block's lines are only counted. A line longer than
    `limits.max_line_bytes` is a block with no lines and its reject, as in line_tasks."""
    size = min(size, limits.max_line_bytes + 1)  # so no line of a block can be too long
    buf = bytearray(size)
    pos, lineno = 0, 0
    with open(path, "rb") as f:
        while True:
            f.seek(pos)
            n = f.readinto(buf)
            if not n:
                return
            cut = buf.rfind(b"\n", 0, n) + 1
            if cut == 0:
                if n == len(buf) and len(buf) <= limits.max_line_bytes:  # a long line
                    buf = bytearray(min(2 * len(buf), limits.max_line_bytes + 1))
                    continue
                if n == len(buf):  # longer than max_line_bytes: streamed past
                    head, length = bytes(buf[: limits.reject_text_bytes]), n
                    f.seek(pos + n)
                    while part := f.readline(1 << 20):
                        length += len(part)
                        if part[-1] == 10:
                            break
                    reason = too_long_reason(limits.max_line_bytes)
                    yield str(path), lineno + 1, b"", (lineno + 1, reason, head, length), zstd
                    buf = bytearray(size)
                    progress.update(length)
                    lineno, pos = lineno + 1, pos + length
                    continue
                cut = n  # the last line, without a newline
            yield str(path), lineno + 1, (pos, cut), None, zstd
            progress.update(cut)
            lineno += count_newlines(buf, cut)
            pos += cut
