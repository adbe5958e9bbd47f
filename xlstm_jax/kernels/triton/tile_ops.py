"""Triton device functions both chunkwise families and the state recurrences use inside their kernels: the
intra-chunk log weights, matmuls whose operands stay inside float16's range, value rows that hold a NaN or inf, the
output epilogue (`normalized`) and the tiles of the state recurrences (`state_tile`; token rows read through pointers
or TMA tensor descriptors: `token_rows`, `row_tile`, `row_tile_t`).

Tiles are 2-D blocks of query rows t by key columns s (or transposed, as the caller broadcasts them). Chunks whose
k or v hold a NaN or inf (chunk_math.nonfinite_chunks) take a careful path in the output kernels: acausal entries are
selected away and non-finite value rows zeroed (`finite_values`), so nothing non-finite reaches an earlier token;
all other chunks take the plain path, which multiplies masked entries by 0. `column_blocks_adjacent` renumbers the
programs of a kernel whose grid axis 2 splits an output's columns.
"""

import triton
import triton.language as tl


@triton.jit
def log_decay(b_t, b_s, ic_s, causal):
    """Log weights F_{t,s} + i_s of key positions s at query positions t of one chunk, less the row's bl_t (the
    caller shifts the row's stabilizer by bl_t instead): (b_t - b_s) + ic_s where `causal`, else -inf, with
    ic_s = i_s - bl_s.

    All operands broadcast to the tile. b, bl: the two-float within-chunk cumsum of the log forget gates
    (chunk_math.split_cumsum): b_t - b_s is exact for nearby positions and bl adds what b rounded away, so a forget gate
    at the floor (a full reset) neither swallows the gates after it nor meets -inf - -inf, at the per-element cost
    of the plain b_t - b_s + i_s.
    """
    return tl.where(causal, (b_t - b_s) + ic_s, float("-inf"))


@triton.jit
def _fit_float16(x):
    """(x / s) in float16 and s: the power of two >= 1 that brings the largest finite magnitude of the (R, C) tile
    x to at most 2^14 (non-finite entries do not set it)."""
    mag = tl.abs(x.to(tl.float32))
    amax = tl.max(tl.max(tl.where(mag < float("inf"), mag, 0.0), axis=1), axis=0)
    s = tl.exp2(tl.ceil(tl.log2(tl.maximum(amax * (1.0 / 16384.0), 1.0))))
    return (x.to(tl.float32) / s).to(tl.float16), s


@triton.jit
def dot_in(a, b, dtype: tl.constexpr):
    """a @ b in float32 with both operands cast to `dtype`. float16: each operand is first divided by a power of two
    that keeps it inside float16's range (scores, states and cotangents are computed in float32 and can exceed it),
    and the product is multiplied back."""
    if dtype == tl.float16:
        a, sa = _fit_float16(a)
        b, sb = _fit_float16(b)
        return tl.dot(a, b, input_precision="ieee") * (sa * sb)
    else:
        return tl.dot(a.to(dtype), b.to(dtype), input_precision="ieee")


@triton.jit
def finite_values(v, causal):
    """v (LKV, BV) with every row that holds a NaN or inf zeroed, and hit (LQ,) int32: 1 for the query rows of
    `causal` (LQ, LKV) that see such a row. A product of masked weights with a NaN row would be NaN in every query
    row, the earlier ones too; callers use the zeroed rows and set the hit rows to NaN."""
    finite = tl.sum(v.to(tl.float32) * 0.0, axis=1) == 0.0
    hit = tl.max(tl.where(causal & (finite == 0)[None, :], 1, 0), axis=1)
    return tl.where(finite[:, None], v, tl.zeros_like(v)), hit


@triton.jit
def column_blocks_adjacent():
    """This program's ids over a 3-D grid (axis 0 int64), renumbered so that programs differing only in their
    axis-2 id run one after the other. The GPU starts programs axis 0 fastest and the launch layer puts BH there,
    so with the hardware ids the column blocks (axis 2) of one chunk tile start BH·(axis-1 size) programs apart.
    Kernels whose axis 2 splits an output's columns read the same q, k and gate rows in each column block; run
    back to back, the later blocks find those rows in L2 instead of HBM."""
    n0 = tl.num_programs(0)
    n1 = tl.num_programs(1)
    n2 = tl.num_programs(2)
    lin = tl.program_id(0) + n0 * (tl.program_id(1) + n1 * tl.program_id(2))
    p2 = lin % n2
    p1 = (lin // n2) % n1
    p0 = lin // (n2 * n1)
    return p0.to(tl.int64), p1, p2


@triton.jit
def normalized(num, den, m_t, NORM_VAL: tl.constexpr, STABILIZE_CORRECTLY: tl.constexpr, EPS: tl.constexpr):
    """The output epilogue: h = num / (max(|den|, lower) + EPS) for rows num (R, BV), den and m_t (R,), with the
    denominator's lower bound NORM_VAL·e^{-m_t} (STABILIZE_CORRECTLY) or NORM_VAL."""
    if STABILIZE_CORRECTLY:
        lower = NORM_VAL * tl.exp(-m_t)
    else:
        lower = tl.zeros_like(m_t) + NORM_VAL
    return num / (tl.maximum(tl.abs(den), lower) + EPS)[:, None]


@triton.jit
def state_tile(GROUPS: tl.constexpr, DHHV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """This program of a state-recurrence grid (BH, GROUPS, cdiv(DHQK, BK) * cdiv(DHHV, BV)): its bh (int64), its
    sequence group, the first row k0 and column v0 of its (BK, BV) tile of C, whether the tile is in the first
    column block (it writes n) and whether it is the first tile (it writes m)."""
    bh = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(2)
    if GROUPS == 1:  # one walk: the group arithmetic folds away
        grp = 0
    else:
        grp = tl.program_id(1)
    NBV: tl.constexpr = (DHHV + BV - 1) // BV
    return bh, grp, (pid // NBV) * BK, (pid % NBV) * BV, pid % NBV == 0, pid == 0


@triton.jit
def token_rows(X, bh, S: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Where `row_tile` reads tiles of the token rows of X (BH, S, D) at `bh`: with TMA, X is a tensor descriptor
    the launch layer made on the host over all BH·S rows (launch's `descriptors`), and this is (X, bh's first row);
    else the rows' base pointer. Made once, before a kernel's loop."""
    if TMA:
        return X, (bh * S).to(tl.int32)
    else:
        return X + bh * S * D


@triton.jit
def row_tile(rows, t0, c0, D: tl.constexpr, L: tl.constexpr, BC: tl.constexpr, TMA: tl.constexpr):
    """The (L, BC) tile at token t0, column c0 of `token_rows`' rows; columns past D read 0."""
    if TMA:
        return rows[0].load([rows[1] + t0, c0])
    else:
        rc = c0 + tl.arange(0, BC)
        return tl.load(rows + (t0 + tl.arange(0, L))[:, None] * D + rc[None, :], mask=(rc < D)[None, :], other=0.0)


@triton.jit
def row_tile_t(rows, t0, c0, D: tl.constexpr, L: tl.constexpr, BC: tl.constexpr, TMA: tl.constexpr):
    """`row_tile` transposed, (BC, L): pointers load it in that layout, a descriptor's tile is transposed."""
    if TMA:
        return tl.trans(rows[0].load([rows[1] + t0, c0]))
    else:
        rc = c0 + tl.arange(0, BC)
        return tl.load(rows + (t0 + tl.arange(0, L))[None, :] * D + rc[:, None], mask=(rc < D)[:, None], other=0.0)

