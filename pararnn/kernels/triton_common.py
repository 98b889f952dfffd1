"""Triton helpers shared by the diagonal and the generated block scan kernels."""
import triton
import triton.language as tl


@triton.jit
def lane_tile(n_lanes, BLOCK: tl.constexpr):
    """Program id -> (batch row as int64, lane offsets ``[BLOCK]``, lane mask)."""
    pid = tl.program_id(0)
    nl = tl.cdiv(n_lanes, BLOCK)
    bi = tl.cast(pid // nl, tl.int64)
    offs = (pid % nl) * BLOCK + tl.arange(0, BLOCK)
    return bi, offs, offs < n_lanes


@triton.jit
def time_index(t0, rows, T, REVERSE: tl.constexpr, ADJOINT: tl.constexpr):
    """Visit order s -> time t, the transition's time ta (int64), and their validity masks."""
    s = t0 + rows
    valid = s < T
    if REVERSE:
        t = T - 1 - s
    else:
        t = s
    if ADJOINT:  # transition of the neighbour already visited
        if REVERSE:
            ta = t + 1
        else:
            ta = t - 1
        va = valid & (s > 0)
    else:
        ta = t
        va = valid
    return tl.cast(t, tl.int64), tl.cast(ta, tl.int64), valid, va


@triton.jit
def mul0(x, y):
    """``x * y``, but exactly 0 where either factor is 0.

    A tree scan forms partial products of transitions that the sequential recurrence never does:
    with A = 100 over 32 steps they overflow to inf while the state they act on is exactly 0, and
    inf * 0 would be NaN where the reference gives 0. Overflow on non-zero values stays inf.
    """
    return tl.where((x == 0) | (y == 0), 0.0, x * y)
