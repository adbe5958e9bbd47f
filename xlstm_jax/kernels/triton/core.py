"""The differentiable core of the Triton chunkwise families: padding, gate vectors, the state recurrences, the
custom_vjp wiring and the gate gradients. It imports no family: a family (`TritonFamily`: limit/family.py,
xl/family.py; by name in families.py) is an object in the call's KernelConfig that launches its own per-chunk
kernels, the outputs and the q, k, v gradients.

Shapes: B, NH, S, DHQK, DHHV; NC chunks of length L; BH = B·NH. Kernel operands are flattened to (BH, ...).
Backward convention: docs/math.md §5 (native/chunk_math.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.base import (
    MLSTMShape,
    at_zero_stabilizer,
    log_forget,
    pad_to_multiple,
    qk_scale,
)
from xlstm_jax.kernels.launch import launch, tma_available
from xlstm_jax.kernels.native.chunk_math import denominator_cotangent, gate_gradients
from xlstm_jax.kernels.triton.gates_kernel import mlstm_chunk_gates_kernel
from xlstm_jax.kernels.triton import launch_table, sequence_groups
from xlstm_jax.kernels.triton.launch_table import LaunchParams
from xlstm_jax.kernels.triton.recurrence_kernels import (
    RecurrentLaunch,
    mlstm_bw_recurrent_kernel,
    mlstm_fw_recurrent_kernel,
)
from xlstm_jax.kernels.triton.tuning import MAX_HEAD_DIM
from xlstm_jax.kernels.sharding import per_batch_head

F32 = jnp.float32


def launch_params(DHQK: int, DHHV: int, cfg: KernelConfig) -> dict[str, LaunchParams]:
    """The typed launch parameters of a call with these head dims on the default device, by section ("recurrent"
    and the family's name): the launch table's entry (launch_table.py) with the call's overrides (cfg.launch,
    "section.field" names) over it."""
    sections = {"recurrent": RecurrentLaunch, cfg.family.name: cfg.family.launch_type}
    overrides: dict[str, dict[str, int]] = {name: {} for name in sections}
    for name, value in cfg.launch:
        group, _, field = name.partition(".")
        if group not in sections or not field:
            raise ValueError(f"launch parameter {name!r} must be one of {[f'{s}.<field>' for s in sections]}.")
        overrides[group][field] = value
    return {name: launch_table.section(name, cls, DHQK, DHHV).replaced(overrides[name], name)
            for name, cls in sections.items()}


def tile_params(chunk_size: int, inter_chunk_size: int | None, tile_q: int | None, tile_kv: int | None):
    """Resolve and check (inter_chunk_size, tile_q, tile_kv) of a tiled family for a chunk size: each a power of
    two >= 16 dividing chunk_size; None picks min(64, chunk_size)."""
    resolved = []
    for name, value in (("inter_chunk_size", inter_chunk_size), ("tile_q", tile_q), ("tile_kv", tile_kv)):
        value = min(64, chunk_size) if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value!r}.")
        if value > chunk_size:
            raise ValueError(f"{name}={value} must not exceed chunk_size={chunk_size}.")
        resolved.append(value)
    return tuple(resolved)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one Triton chunkwise call (hashable: it is a custom_vjp static argument)."""

    chunk_size: int
    eps: float
    compute_dtype: str
    norm_val: float = 1.0
    stabilize_correctly: bool = True
    recompute_states_in_bw: bool = True
    reduce_slicing: bool = True
    family: TritonFamily | None = None  # the per-chunk kernels (a family object, families.families())
    inter_chunk_size: int | None = None  # recurrent granularity (divides chunk_size); None: chunk_size
    tile_q: int | None = None  # tiled families: query rows per tile (LQ)
    tile_kv: int | None = None  # tiled families: key rows per tile (LKV)
    # False: the stabilizer m is held at 0 (no max-state; MLSTMOptions.max_state): log gates must be <= 0, m_initial
    # is not used (`run` folds it into C and n first)
    max_state: bool = True
    # ("section.field", value) pairs over the launch table's parameters for this call (launch_params), e.g.
    # ("recurrent.programs", 4); part of the jit key
    launch: tuple[tuple[str, int], ...] = ()

    @property
    def recurrent_chunk(self) -> int:
        return self.inter_chunk_size or self.chunk_size

    def with_launch(self, params: Mapping[str, int] | None = None) -> KernelConfig:
        """This configuration with `params` ("section.field" -> value) over its launch parameters."""
        return dataclasses.replace(self, launch=tuple(sorted({**dict(self.launch), **(params or {})}.items())))


def block(dim: int, cap: int) -> int:
    """Head-dim block: the next power of two >= dim (at least 16), capped at `cap`."""
    return min(cap, max(16, 1 << (dim - 1).bit_length()))


def check_head_dims(shape: MLSTMShape) -> None:
    for name, dim in (("DHQK (q, k last axis)", shape.DHQK), ("DHHV (v last axis)", shape.DHHV)):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be <= {MAX_HEAD_DIM} for the Triton kernels, got {dim}.")


def flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


class Operands(NamedTuple):
    """What a family's per-chunk kernels read (flattened, padded; see `forward` and `backward_parallel`): q, k
    (BH, S, DHQK), v (BH, S, DHHV) in the compute dtype; i (BH, S) float32; gates = gate_vectors(...); the
    chunk-border states c_all, n_all, m_all and the buffers the kernels read c_in, n_in (_kernel_states); for the
    backward also dh, m_out, norm, dden and the state cotangents dc_all, dn_all."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    i: jax.Array
    gates: tuple[jax.Array, ...]
    c_all: jax.Array
    n_all: jax.Array
    m_all: jax.Array
    c_in: jax.Array
    n_in: jax.Array
    dh: jax.Array | None = None
    m_out: jax.Array | None = None
    norm: jax.Array | None = None
    dden: jax.Array | None = None
    dc_all: jax.Array | None = None
    dn_all: jax.Array | None = None

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(BH, S, DHQK, DHHV)."""
        return (*self.q.shape, self.v.shape[-1])

    def output_inputs(self) -> list[jax.Array]:
        """The inputs of an output kernel, in kernel order (Q, K, V, VEC_B, VEC_BL, I, C_ALL, N_ALL, M_ALL)."""
        vec_b, vec_bl, _, _ = self.gates
        return [self.q, self.k, self.v, vec_b, vec_bl, self.i, self.c_in, self.n_in, self.m_all]

    def dq_inputs(self) -> list[jax.Array]:
        vec_b, vec_bl, _, _ = self.gates
        return [self.q, self.k, self.v, self.dh, vec_b, vec_bl, self.i, self.m_out, self.norm, self.dden, self.c_in,
                self.n_in, self.m_all]

    def dkdv_inputs(self) -> list[jax.Array]:
        vec_b, vec_bl, vec_a, _ = self.gates
        return [self.q, self.k, self.v, self.dh, vec_b, vec_bl, vec_a, self.i, self.m_out, self.norm, self.dden,
                self.m_all, self.dc_all, self.dn_all]

    def gradient_inputs(self) -> list[jax.Array]:
        """The inputs of a kernel forming dq, dk and dv at once: dkdv_inputs' and the states dq reads (C_ALL,
        N_ALL)."""
        return [*self.dkdv_inputs(), self.c_in, self.n_in]


class TritonFamily(Protocol):
    """The per-chunk kernels of a Triton chunkwise family; everything else (padding, gates, state recurrences,
    custom_vjp, gate gradients) is this module's. A family is a frozen dataclass (hashable: part of the config)."""

    name: str  # also its launch table section
    launch_type: type[LaunchParams]  # the typed launch parameters of its per-chunk kernels

    def configure(self, chunk_size: int, tiles: tuple[int | None, ...]) -> dict[str, Any]:
        """KernelConfig fields of a call with these tiles (tile_q, tile_kv, inter_chunk_size), checked."""

    def outputs(self, x: Operands, cfg: KernelConfig, p: LaunchParams, out_dtype) -> tuple[jax.Array, ...]:
        """h (BH, S, DHHV) in out_dtype, the signed denominator and m_t (BH, S) float32."""

    def warps_fields(self, num_warps: int) -> dict[str, int]:
        """The launch overrides ("section.field" -> value) that set the warps of every per-chunk kernel."""

    def input_gradients(self, x: Operands, cfg: KernelConfig, p: LaunchParams, grad_dtypes) -> tuple:
        """dq, dk, dv in grad_dtypes and the float32 row dot products q_t·dq_t, k_t·dk_t (BH, S)."""


def output_consts(x: Operands, cfg: KernelConfig, p: LaunchParams) -> dict[str, Any]:
    """The compile-time constants every output kernel takes."""
    BH, S, DHQK, DHHV = x.dims
    return dict(NC=S // cfg.chunk_size, NS=x.c_in.shape[1], L=cfg.chunk_size, DHQK=DHQK, DHHV=DHHV,
                BK=block(DHQK, p.block), QK_SCALE=qk_scale(DHQK), EPS=cfg.eps, NORM_VAL=cfg.norm_val,
                STABILIZE_CORRECTLY=cfg.stabilize_correctly, MAX_STATE=cfg.max_state)


def gradient_consts(x: Operands, cfg: KernelConfig, p: LaunchParams) -> dict[str, Any]:
    """The compile-time constants every input-gradient kernel takes."""
    BH, S, DHQK, DHHV = x.dims
    return dict(NC=S // cfg.chunk_size, L=cfg.chunk_size, DHQK=DHQK, DHHV=DHHV, BK=block(DHQK, p.block),
                BV=block(DHHV, p.block), QK_SCALE=qk_scale(DHQK))


def gate_vectors(i: jax.Array, f: jax.Array, L: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """vecB, vecB_lo, vecA (BH, S) and scaG (BH, S // L) float32 from (BH, S) float32 gates, for chunks of length
    L (chunk_math.chunk_gates and the low part of chunk_math.split_cumsum, in one Triton launch)."""
    BH, S = i.shape
    seq = jax.ShapeDtypeStruct((BH, S), F32)
    outs = [seq, seq, seq, jax.ShapeDtypeStruct((BH, S // L), F32)]
    return launch(mlstm_chunk_gates_kernel, [log_forget(f), i], outs, grid=(S // L,), num_warps=1 if L <= 128 else 4,
                  NC=S // L, L=L)


def _state_buffer_dtype(compute_dtype: jnp.dtype) -> jnp.dtype:
    """dtype of the stored chunk-border states and their cotangents: the compute dtype (they are only matmul
    operands), float32 for float16, whose range sums of k·v products overflow."""
    return F32 if compute_dtype == jnp.float16 else compute_dtype


def token_descriptors(use: int, L: int, rows: Sequence[jax.Array], columns: Sequence[int]) -> dict:
    """`launch`'s descriptors for a kernel whose first inputs are `rows` (BH, S, D each), read in (L, column) tiles
    through TMA tensor descriptors where `use` (a launch-table flag) says so and this machine allows it (the
    hardware needs every row to start at a multiple of 16 bytes; a descriptor's row coordinates are int32, so its
    BH·S rows stay below 2^31, where pointer loads take int64 offsets); {} for pointer loads. The kernel's TMA
    constant is whether this is non-empty."""
    if not use or not tma_available():
        return {}
    if any(x.shape[-1] * x.dtype.itemsize % 16 or x.shape[0] * x.shape[1] >= 2**31 for x in rows):
        return {}
    return {index: (L, c) for index, c in enumerate(columns)}


def recurrent_launch(BH: int, NC: int, DHQK: int, DHHV: int, cfg: KernelConfig, rows: tuple = ()) -> dict:
    """Grid, head-dim tiles, sequence groups (sequence_groups.py) and launch parameters of a state-recurrence kernel
    over NC chunks: one (BK, BV) tile of C of one group a program; the token tiles of `rows` (its (BH, S, D)
    operands, first among its inputs) through TMA descriptors where the table says so (`token_descriptors`)."""
    p = launch_params(DHQK, DHHV, cfg)["recurrent"]
    BK, BV = block(DHQK, p.block), block(DHHV, p.block)
    tiles = -(-DHQK // BK) * -(-DHHV // BV)
    groups = sequence_groups.num_groups(BH * tiles, NC, p.programs)
    descriptors = token_descriptors(p.tma, cfg.recurrent_chunk, rows, (BK, BV)) if rows else {}
    return dict(grid=(groups, tiles), num_warps=p.warps, num_stages=p.stages, DHQK=DHQK, DHHV=DHHV, BK=BK, BV=BV,
                GROUPS=groups, descriptors=descriptors, TMA=bool(descriptors))


def _recurrent_gates(i, f, cfg: KernelConfig, gates):
    """`gate_vectors` at the state recurrence's granularity: `gates` (those of chunk_size) when it is chunk_size."""
    if gates is not None and cfg.recurrent_chunk == cfg.chunk_size:
        return gates
    return gate_vectors(i, f, cfg.recurrent_chunk)


def chunk_states(k, v, i, f, c0, n0, m0, cfg: KernelConfig, gates=None):
    """States at chunk borders C (BH, NC+1, DHQK, DHHV) in the state-buffer dtype (only ever a matmul operand),
    n (BH, NC+1, DHQK), m (BH, NC+1), m at every recurrent sub-chunk border (BH, S // recurrent_chunk + 1), and the
    last C (BH, DHQK, DHHV); float32 unless said otherwise. `gates`: `gate_vectors(i, f, chunk_size)` if made."""
    BH, S, DHQK = k.shape
    DHHV = v.shape[-1]
    Lr = cfg.recurrent_chunk
    every = cfg.chunk_size // Lr
    _, _, vec_a, sca_g = _recurrent_gates(i, f, cfg, gates)
    kw = recurrent_launch(BH, S // Lr, DHQK, DHHV, cfg, (k, v))
    if not cfg.max_state:
        m0 = jnp.zeros_like(m0)
    c0, n0, m0 = sequence_groups.incoming_states(k, v, vec_a, sca_g, c0, n0, m0, kw["GROUPS"])
    # every walk holds its incoming m: groups start at m = 0 too (the combine's m is <= 0 here)
    if not cfg.max_state and kw["GROUPS"] > 1:
        c0, n0, m0 = at_zero_stabilizer(c0, n0, m0)
    c_all, n_all, m_sub, c_last = launch(
        mlstm_fw_recurrent_kernel,
        [k, v, vec_a, sca_g, c0, n0, m0],
        [
            jax.ShapeDtypeStruct((BH, S // cfg.chunk_size + 1, DHQK, DHHV), _state_buffer_dtype(k.dtype)),
            jax.ShapeDtypeStruct((BH, S // cfg.chunk_size + 1, DHQK), F32),
            jax.ShapeDtypeStruct((BH, S // Lr + 1), F32),
            jax.ShapeDtypeStruct((BH, DHQK, DHHV), F32),
        ],
        NC=S // Lr, L=Lr, SAVE_EVERY=every, MAX_STATE=cfg.max_state, **kw,
    )
    return c_all, n_all, m_sub[:, ::every], m_sub, c_last


def _kernel_states(c_all, n_all, cfg: KernelConfig):
    """The state buffers the output / dq kernels read: whole (reduce_slicing) or without the last state."""
    return (c_all, n_all) if cfg.reduce_slicing else (c_all[:, :-1], n_all[:, :-1])


def forward(q, k, v, i, f, c0, n0, m0, cfg: KernelConfig, out_dtype):
    """Flattened, padded inputs (q, k, v in the compute dtype). Returns h (BH, S, DHHV) in `out_dtype`, the signed
    denominator and m_t (BH, S) float32, and the states."""
    DHQK, DHHV = q.shape[-1], v.shape[-1]
    gates = gate_vectors(i, f, cfg.chunk_size)
    states = chunk_states(k, v, i, f, c0, n0, m0, cfg, gates)
    c_all, n_all, m_all = states[:3]
    c_in, n_in = _kernel_states(c_all, n_all, cfg)
    x = Operands(q, k, v, i, gates, c_all, n_all, m_all, c_in, n_in)
    h, den, m_out = cfg.family.outputs(x, cfg, launch_params(DHQK, DHHV, cfg)[cfg.family.name], out_dtype)
    return h, den, m_out, states


def state_cotangents(qf, dh, i_f, f_f, m_out, norm, dden, m_sub, dc_last, dn_last, cfg: KernelConfig, gates=None):
    """Cotangents of the chunk-border states: dC (BH, NC+1, DHQK, DHHV) in the state-buffer dtype, dn (BH, NC+1, DHQK)
    float32 and the initial state's dC (BH, DHQK, DHHV) float32, from the last states' float32 cotangents.
    `gates`: `gate_vectors(i_f, f_f, chunk_size)` if already made."""
    BH, S, DHQK = qf.shape
    DHHV = dh.shape[-1]
    Lr = cfg.recurrent_chunk
    NC = S // cfg.chunk_size
    vec_b_sub, _, _, sca_g_sub = _recurrent_gates(i_f, f_f, cfg, gates)
    kw = recurrent_launch(BH, S // Lr, DHQK, DHHV, cfg, (qf, dh))
    dc_last, dn_last = sequence_groups.outgoing_cotangents(qf, dh, vec_b_sub, sca_g_sub, m_sub, m_out, norm, dden,
                                                           dc_last, dn_last, kw["GROUPS"], qk_scale(DHQK))
    return launch(
        mlstm_bw_recurrent_kernel,
        [qf, dh, vec_b_sub, m_out, norm, dden, sca_g_sub, m_sub, dc_last, dn_last],
        [jax.ShapeDtypeStruct((BH, NC + 1, DHQK, DHHV), _state_buffer_dtype(qf.dtype)),
         jax.ShapeDtypeStruct((BH, NC + 1, DHQK), F32),
         jax.ShapeDtypeStruct((BH, DHQK, DHHV), F32)],
        NC=S // Lr, L=Lr, QK_SCALE=qk_scale(DHQK), SAVE_EVERY=cfg.chunk_size // Lr, **kw,
    )


def backward_parallel(qf, kf, vf, dh, gates, i_f, m_out, norm, dden, c_all, n_all, m_all, dc_all, dn_all,
                       cfg: KernelConfig, grad_dtypes):
    """dq, dk, dv (BH, S, ·) in `grad_dtypes` (three dtypes) from the per-chunk kernels of the family, and the
    float32 row dot products q_t·dq_t, k_t·dk_t (BH, S). `gates`: `gate_vectors(i_f, f_f, chunk_size)`."""
    c_in, n_in = _kernel_states(c_all, n_all, cfg)
    x = Operands(qf, kf, vf, i_f, gates, c_all, n_all, m_all, c_in, n_in, dh, m_out, norm, dden, dc_all, dn_all)
    p = launch_params(qf.shape[-1], vf.shape[-1], cfg)[cfg.family.name]
    return cfg.family.input_gradients(x, cfg, p, grad_dtypes)


def _pad_flat(q, k, v, i, f, L):
    q, k, v, i, f = pad_to_multiple(q, k, v, i, f, L)
    return tuple(flat(x) for x in (q, k, v, i, f))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def mlstm_triton_core(q, k, v, i, f, c0, n0, m0, cfg: KernelConfig):
    """(B, NH, S, ·) inputs, float32 gates (B, NH, S) and states -> (h in q's dtype, C_last, n_last, m_last). Under
    jit, inputs sharded over B and/or NH run where they are (kernels/sharding.py)."""
    return _forward(cfg, False, q, k, v, i, f, c0, n0, m0)


def _forward_arrays(cfg: KernelConfig, residuals: bool, q, k, v, i, f, c0, n0, m0):
    """(h, C_last, n_last, m_last) and, with `residuals`, what the backward needs: h, den, m_out (and the chunk
    states unless they are recomputed), as (B, NH, ...) arrays."""
    B, NH, S, _ = q.shape
    dt = jnp.dtype(cfg.compute_dtype)
    qf, kf, vf, i_f, f_f = _pad_flat(q.astype(dt), k.astype(dt), v.astype(dt), i, f, cfg.chunk_size)
    h, den, m_out, states = forward(qf, kf, vf, i_f, f_f, flat(c0), flat(n0), flat(m0), cfg, q.dtype)
    _, n_all, m_all, _, c_last = states
    out = (
        h.reshape(B, NH, -1, h.shape[-1])[:, :, :S],
        c_last.reshape(c0.shape),
        n_all[:, -1].reshape(n0.shape),
        m_all[:, -1].reshape(m0.shape),
    )
    if not residuals:
        return out
    kept = (h, den, m_out) + (() if cfg.recompute_states_in_bw else states)
    return out + tuple(x.reshape(B, NH, *x.shape[1:]) for x in kept)


_forward = per_batch_head(_forward_arrays, n_static=2)


def core_fwd(q, k, v, i, f, c0, n0, m0, cfg: KernelConfig):
    outs = _forward(cfg, True, q, k, v, i, f, c0, n0, m0)
    return outs[:4], (q, k, v, i, f, c0, n0, m0, *outs[4:])


def core_bwd(cfg: KernelConfig, residuals, cotangents):
    return _backward(cfg, *residuals[:8], *cotangents, *residuals[8:])


def _backward_arrays(cfg: KernelConfig, q, k, v, i, f, c0, n0, m0, dh, dc_last, dn_last, dm_last, h, den, m_out,
                     *states):
    """The cotangents of (q, k, v, i, f, c0, n0, m0) from those of the outputs and the forward's residuals."""
    h, den, m_out = flat(h), flat(den), flat(m_out)
    states = tuple(flat(x) for x in states) or None
    B, NH, S, _ = q.shape
    dt = jnp.dtype(cfg.compute_dtype)
    qf, kf, vf, i_f, f_f = _pad_flat(q.astype(dt), k.astype(dt), v.astype(dt), i, f, cfg.chunk_size)
    S_pad = i_f.shape[1]
    dh = flat(jnp.pad(dh, ((0, 0), (0, 0), (0, S_pad - S), (0, 0))))
    c0f, n0f, m0f = flat(c0), flat(n0), flat(m0)
    gates = gate_vectors(i_f, f_f, cfg.chunk_size)
    if states is None:
        states = chunk_states(kf, vf, i_f, f_f, c0f, n0f, m0f, cfg, gates)
    c_all, n_all, m_all, m_sub, c_last = states
    lower = cfg.norm_val * jnp.exp(-m_out) if cfg.stabilize_correctly else jnp.full_like(m_out, cfg.norm_val)
    norm, dden = denominator_cotangent(dh, h, den, lower, cfg.eps)
    dc_lastf, dn_lastf = flat(dc_last.astype(F32)), flat(dn_last.astype(F32))

    dc_all, dn_all, dc_first = state_cotangents(qf, dh, i_f, f_f, m_out, norm, dden, m_sub, dc_lastf, dn_lastf, cfg,
                                                 gates)
    dq, dk, dv, qdq, kdk = backward_parallel(qf, kf, vf, dh, gates, i_f, m_out, norm, dden, c_all, n_all, m_all,
                                              dc_all, dn_all, cfg, (q.dtype, k.dtype, v.dtype))
    first_dot = jnp.sum(c0f * dc_first, axis=(-2, -1)) + jnp.sum(n0f * dn_all[:, 0], axis=-1)
    last_dot = jnp.sum(c_last * dc_lastf, axis=(-2, -1)) + jnp.sum(n_all[:, -1] * dn_lastf, axis=-1)
    di, df, dm0 = gate_gradients(
        qdq, kdk, i_f, f_f, m0f, first_state_dot=first_dot, last_state_dot=last_dot,
        dm_last=flat(dm_last.astype(F32)), max_state=cfg.max_state,
    )

    def unflat(x, like):
        return x.reshape(B, NH, *x.shape[1:])[:, :, :S].astype(like.dtype)

    return (
        unflat(dq, q), unflat(dk, k), unflat(dv, v), unflat(di, i), unflat(df, f),
        dc_first.reshape(c0.shape).astype(c0.dtype),
        dn_all[:, 0].reshape(n0.shape).astype(n0.dtype),
        dm0.reshape(m0.shape).astype(m0.dtype),
    )


_backward = per_batch_head(_backward_arrays, n_static=1)
mlstm_triton_core.defvjp(core_fwd, core_bwd)
