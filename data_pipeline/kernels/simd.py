"""What the compiled kernels share: whether numba is installed, and the intrinsics that look at
64 bytes at once (one vector compare; LLVM maps the <64 x i8> vector to AVX-512, AVX2 or SSE,
as the CPU has).

A byte mask (`byte_mask64`) is a uint64 whose bit i says whether byte i of the 64 at an
address passes a test; trailing-zero counts then walk the set bits. A byte-at-a-time loop
mispredicts a branch at nearly every word or token boundary, which is why the MinHash word
splitter and the JSONL scanner both go through these (`python benchmarks/dedup_kernels.py`
times each kernel against its byte loop or numpy form). Every reader of 64-byte chunks needs
64 readable bytes past the data it looks at; the bits of those bytes are the caller's to mask.

Imports: numpy, numba and llvmlite only.
"""

from __future__ import annotations

from collections.abc import Callable

try:  # numba is optional: every kernel has a numpy or hashlib path with the same results.
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised on machines without numba
    numba = None
    HAVE_NUMBA = False

if HAVE_NUMBA:
    from llvmlite import ir
    from numba.extending import intrinsic

    V64 = ir.VectorType(ir.IntType(8), 64)

    def _splat(c: int) -> ir.Constant:
        return ir.Constant(V64, [c] * 64)

    def _load64(builder, addr):
        return builder.load(builder.inttoptr(addr, V64.as_pointer()), align=1)

    def byte_mask64(test: Callable) -> Callable:
        """An intrinsic taking an address (intp) and returning the uint64 mask of the 64 bytes
        there for which `test(builder, v, k)` is true: v is the <64 x i8> vector of the bytes,
        k(c) the constant c in every lane; `test` returns a <64 x i1> vector."""

        @intrinsic
        def mask(typingctx, addr):
            def codegen(context, builder, sig, args):
                m = test(builder, _load64(builder, args[0]), _splat)
                return builder.bitcast(m, ir.IntType(64))

            return numba.types.uint64(numba.types.intp), codegen

        return mask

    def _in_range(b, v, k, lo: int, count: int):
        """lo <= byte < lo + count, as one unsigned compare."""
        return b.icmp_unsigned("<", b.sub(v, k(lo)), k(count))

    def _ascii_ws(b, v, k):  # what str.isspace says of ASCII bytes: 9..13 and 28..32
        return b.or_(
            b.or_(b.icmp_unsigned("==", v, k(32)), _in_range(b, v, k, 9, 5)),
            _in_range(b, v, k, 28, 4),
        )

    def _ws_lead(b, v, k):  # bytes that may start a multi-byte Unicode whitespace character
        return b.or_(b.icmp_unsigned("==", v, k(0xC2)), _in_range(b, v, k, 0xE1, 3))

    def _string_special(b, v, k):  # what ends a plain run inside a JSON string
        quote_or_backslash = b.or_(b.icmp_unsigned("==", v, k(34)), b.icmp_unsigned("==", v, k(92)))
        control_or_high = b.or_(b.icmp_unsigned("<", v, k(32)), b.icmp_unsigned(">=", v, k(128)))
        return b.or_(quote_or_backslash, control_or_high)

    def _newline(b, v, k):
        return b.icmp_unsigned("==", v, k(10))

    ws_mask64 = byte_mask64(_ascii_ws)
    ws_lead_mask64 = byte_mask64(_ws_lead)
    special_mask64 = byte_mask64(_string_special)
    newline_mask64 = byte_mask64(_newline)

    @intrinsic
    def newline_count64(typingctx, addr):
        """The number of b"\\n" among the 64 bytes at addr."""

        def codegen(context, builder, sig, args):
            m = builder.bitcast(
                _newline(builder, _load64(builder, args[0]), _splat), ir.IntType(64)
            )
            return builder.ctpop(m)

        return numba.types.uint64(numba.types.intp), codegen

    @intrinsic
    def copy64(typingctx, dst, src):
        """Copy 64 bytes from src to dst (addresses; the ranges must not overlap)."""

        def codegen(context, builder, sig, args):
            v = _load64(builder, args[1])
            builder.store(v, builder.inttoptr(args[0], V64.as_pointer()), align=1)
            return context.get_dummy_value()

        return numba.types.none(numba.types.intp, numba.types.intp), codegen
