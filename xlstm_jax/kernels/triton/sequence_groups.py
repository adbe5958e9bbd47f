"""Long sequences on few heads: the state recurrences in parallel groups of chunks (docs/design.md, "Sequence
groups").

A recurrence kernel walks the chunks of one (b, h) serially, one program per (BK, BV) tile of C. When B·NH·tiles
programs cannot fill the GPU (one long sequence), the NC chunks are split into NG equal groups, walked at once:

- forward: each group's summary (kernels/native/state_combine.py) is one matmul over its tokens, K̄ᵀ V with
  k̄_s = k_s e^{i_s + sum_{r>s} log f_r - M} (r within the group); an associative scan of the summaries gives the
  state entering every group, from which the kernel's group walks store the same chunk-border states as one walk;
- backward: the state cotangents obey the linear map dC_start = D dC_end + Q̄ᵀ (dH / norm) over a group, with
  D = e^{G + m_start - m_end} <= 1 and q̄_t = q_t e^{sum_{r<=t} log f_r + m_start - m_t} scale (r from the group's
  start; m_t the output stabilizer), so a reverse scan of these maps gives the cotangent leaving every group.

Everything here is XLA on (BH, ...) operands in the kernels' layouts (recurrence_kernels.py): float32 summaries,
matmul operands in the compute dtype with float32 accumulation, as in the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.native.state_combine import (
    apply,
    compose,
    floor_no_input,
    identity_like,
    shifted,
    token_matmul,
    weighted_summary,
)

F32 = jnp.float32
MIN_GROUP_CHUNKS = 4  # chunks (of the recurrence's granularity) per group at least


def num_groups(programs: int, NC: int, target_programs: int) -> int:
    """NG: the smallest power of two with programs · NG >= target_programs, NG dividing NC into groups of at
    least MIN_GROUP_CHUNKS chunks; 1 (one walk) when `programs` (B·NH·tiles) already reach the target."""
    ng = 1
    while programs * ng < target_programs and NC % (2 * ng) == 0 and NC // (2 * ng) >= MIN_GROUP_CHUNKS:
        ng *= 2
    return ng


def _grouped(x: jax.Array, NG: int) -> jax.Array:
    """(BH, N, ...) -> (BH, NG, N // NG, ...)."""
    return x.reshape(x.shape[0], NG, x.shape[1] // NG, *x.shape[2:])


def _exclusive(inclusive, identity):
    """Shift an inclusive scan along axis 1 by one group, `identity` first."""
    return tuple(jnp.concatenate([e[:, :1], x[:, :-1]], axis=1) for x, e in zip(inclusive, identity))


def incoming_states(k, v, vec_a, sca_g, c0, n0, m0, NG: int):
    """The states entering each of NG groups: C (BH, NG, DHQK, DHHV), n (BH, NG, DHQK), m (BH, NG) float32.

    k (BH, S, DHQK), v (BH, S, DHHV) in the compute dtype; vec_a (BH, S), sca_g (BH, NC) float32 at the
    recurrence's granularity; c0, n0, m0: the initial states (BH, ...) float32.
    """
    if NG == 1:
        return c0[:, None], n0[:, None], m0[:, None]
    BH, S, DHQK = k.shape
    g = _grouped(sca_g, NG)  # (BH, NG, NCG)
    later = shifted(jnp.cumsum(g[..., ::-1], axis=-1))[..., ::-1]  # decay after each chunk, in its group
    log_w = _grouped(vec_a.reshape(BH, g.shape[1] * g.shape[2], -1), NG) + later[..., None]  # (BH, NG, NCG, L)
    M = floor_no_input(jnp.max(log_w, axis=(-2, -1)))
    C_b, n_b = weighted_summary(_grouped(k, NG), _grouped(v, NG), log_w.reshape(BH, NG, -1), M)
    summaries = (jnp.sum(g, axis=-1), C_b, n_b, M)
    before = _exclusive(jax.lax.associative_scan(compose, summaries, axis=1), identity_like(summaries))
    return apply(before, (c0[:, None], n0[:, None], m0[:, None]))


def _then(first, second):
    """The affine map y -> D y + (C, n) of `first` followed by that of `second`."""
    D1, C1, n1 = first
    D2, C2, n2 = second
    return D2 * D1, D2[..., None, None] * C1 + C2, D2[..., None] * n1 + n2


def outgoing_cotangents(q, dh, vec_b, sca_g, m_sub, m_out, norm, dden, dc_last, dn_last, NG: int, scale: float):
    """The state cotangents leaving each of NG groups (at its end): dC (BH, NG, DHQK, DHHV), dn (BH, NG, DHQK)
    float32.

    q (BH, S, DHQK), dh (BH, S, DHHV) in the compute dtype; vec_b, m_out, norm, dden (BH, S) and sca_g (BH, NC)
    float32 at the recurrence's granularity; m_sub (BH, NC + 1) the stabilizer at every chunk border; dc_last,
    dn_last: the last states' cotangents (BH, ...) float32; scale: the q·k scale.
    """
    if NG == 1:
        return dc_last[:, None], dn_last[:, None]
    BH, S, DHQK = q.shape
    g = _grouped(sca_g, NG)
    NCG = g.shape[-1]
    m_start, m_end = m_sub[:, :-1:NCG], m_sub[:, NCG::NCG]
    before = shifted(jnp.cumsum(g, axis=-1))  # decay of the group's chunks before each
    log_u = _grouped(vec_b.reshape(BH, NG * NCG, -1), NG) + before[..., None] + m_start[..., None, None]
    u = jnp.exp(log_u.reshape(BH, NG, -1) - _grouped(m_out, NG)) * scale
    qbar = _grouped(q, NG).astype(F32) * u[..., None]
    dh_n = (_grouped(dh, NG).astype(F32) / _grouped(norm, NG)[..., None]).astype(q.dtype)
    maps = (jnp.exp(jnp.sum(g, axis=-1) + m_start - m_end), token_matmul(qbar.astype(q.dtype), dh_n),
            jnp.sum(qbar * _grouped(dden, NG)[..., None], axis=-2))
    # from the last group to the first: the composition of the maps of groups g..NG-1, shifted to groups g+1..NG-1
    flipped = tuple(x[:, ::-1] for x in maps)
    identity = (jnp.ones_like(maps[0]), jnp.zeros_like(maps[1]), jnp.zeros_like(maps[2]))
    after = _exclusive(jax.lax.associative_scan(_then, flipped, axis=1), identity)
    D, C, n = (x[:, ::-1] for x in after)
    return D[..., None, None] * dc_last[:, None] + C, D[..., None] * dn_last[:, None] + n
