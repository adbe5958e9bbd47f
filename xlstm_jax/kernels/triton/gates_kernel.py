"""Triton kernel of the per-chunk gate quantities both Triton families read (those of chunk_math.chunk_gates, with
the two-float low part of vecB of chunk_math.split_cumsum): one launch instead of XLA's cumulative sums.

Layouts (BH = B·NH flattened, S = NC·L padded): LOGF (the floored log forget gates, base.log_forget) and I (BH, S)
float32 in; B, B_LO, A (BH, S) and G (BH, NC) float32 out.
"""

import triton
import triton.language as tl


@triton.jit
def _two_sum_add(hi_a, lo_a, hi_b, lo_b):
    """(hi_a + lo_a) + (hi_b + lo_b) as a two-float sum: the rounded sum and what rounding left out (Knuth's
    two-sum) plus both low parts."""
    hi = hi_a + hi_b
    back = hi - hi_a
    err = (hi_a - (hi - back)) + (hi_b - back)
    return hi, lo_a + lo_b + err


@triton.jit
def mlstm_chunk_gates_kernel(LOGF, I, B, B_LO, A, G, NC: tl.constexpr, L: tl.constexpr):
    """Grid (BH, NC): for one chunk, b_t = sum_{r<=t} logf_r as the two-float (B, B_LO) (chunk_math.split_cumsum),
    a_t = sum_{r>t} logf_r + i_t and g = sum_r logf_r. Each suffix sums only its own terms."""
    bh = tl.program_id(0).to(tl.int64)
    kc = tl.program_id(1)
    S: tl.constexpr = NC * L
    rt = tl.arange(0, L)
    rows = bh * S + kc * L + rt
    logf = tl.load(LOGF + rows)
    b, b_lo = tl.associative_scan((logf, tl.zeros_like(logf)), 0, _two_sum_add)
    after = tl.cumsum(tl.load(LOGF + rows + 1, mask=rt < L - 1, other=0.0), 0, reverse=True)
    tl.store(B + rows, b)
    tl.store(B_LO + rows, b_lo)
    tl.store(A + rows, after + tl.load(I + rows))
    tl.store(G + bh * NC + kc, tl.sum(logf, axis=0))
