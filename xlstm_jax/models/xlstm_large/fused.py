"""The block's memory-bound elementwise ops, each with a backward of its own (`jax.custom_vjp`).

Autodiff's jaxpr of these ops keeps several float32 intermediates of the activation's size for the backward (the
normalised x, x times the weight, the sigmoid of the gate, ...: six (B, S, NH * DHV) float32 arrays per block for
the output gate and its norm alone). Here each forward keeps only its inputs and a float32 statistic per row (per
head), and its backward recomputes the rest in the pass that forms the cotangents. XLA had recomputed most of those
intermediates in its fusions already, so on an H100 this took 2.7 GB of temporaries off the 1.3B training step at
B=8 (0.5 GB off the 125M) and no time (docs/benchmarks.md, fifth session). Statistics and arithmetic in float32
(float64 for float64 inputs); cotangents come back in their primal's dtype.

- `rms_norm(x, weight, bias, eps, out_dtype)`: x (..., D) -> x rsqrt(mean(x^2) + eps) weight (+ bias) (..., D) in
  out_dtype (None: float32).
- `gated_head_norm(h, gate, weight, bias, eps, out_dtype)`: h (..., NH, S, DHV) (the cell's layout), gate
  (..., S, NH * DHV) -> sigmoid(gate) * (LayerNorm over each head's DHV, token-major, flattened, times weight
  (+ bias)), (..., S, NH * DHV) in out_dtype.
- `swiglu(z)`: z (..., 2F) = gate | up -> silu(gate) * up (..., F) in z's dtype; `swiglu_pair(gate, up)` the same
  of the halves as two arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _wide(a: jax.Array) -> jax.Array:
    """a in float32, or in its own dtype where wider (float64)."""
    return a.astype(jnp.promote_types(a.dtype, F32))


def _rows_sum(a: jax.Array, like: jax.Array) -> jax.Array:
    """a (..., D) summed over every axis but the last, in `like`'s dtype: a parameter's gradient. Inside
    `shard_map` the rows may be split over mesh axes the parameter is not (a split sequence): the sum then runs
    over those axes too (`psum`), as autodiff's transpose of the parameter's broadcast does."""
    total = a.reshape(-1, a.shape[-1]).sum(axis=0).astype(like.dtype)
    split = tuple(sorted(_varying(total) - _varying(like)))
    return jax.lax.psum(total, split) if split else total


def _varying(a: jax.Array) -> frozenset:
    """The shard_map axes `a` varies over (jax >= 0.10: `manual_axis_type.varying`; earlier: `vma`)."""
    aval = jax.typeof(a)
    kind = getattr(aval, "manual_axis_type", None)
    return frozenset(kind.varying if kind is not None else getattr(aval, "vma", ()))


def _affine(y: jax.Array, weight: jax.Array, bias: jax.Array | None) -> jax.Array:
    y = y * _wide(weight)
    return y if bias is None else y + _wide(bias)


# ---- RMSNorm ----------------------------------------------------------------------------------------------------

def _rms_statistic(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """x (..., D) -> (x widened, rsqrt(mean(x^2) + eps) (..., 1))."""
    x = _wide(x)
    return x, jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def rms_norm(x: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float, out_dtype: Any = None
             ) -> jax.Array:
    """x (..., D) -> x rsqrt(mean(x^2) + eps) * weight (+ bias) (..., D) in out_dtype (None: float32, or x's wider
    dtype), formed in float32; weight, bias (D,). The blocks ask for the compute dtype, which their projections
    cast to anyway: the output and its cotangent then take half the bytes of float32. The backward keeps x and the
    per-row rsqrt only."""
    return _rms_norm_fwd(x, weight, bias, eps, out_dtype)[0]


def _rms_norm_fwd(x, weight, bias, eps, out_dtype):
    xw, rstd = _rms_statistic(x, eps)
    y = _affine(xw * rstd, weight, bias)
    return y.astype(out_dtype or y.dtype), (x, rstd, weight, bias)


def _rms_norm_bwd(eps, out_dtype, residuals, g):
    x, rstd, weight, bias = residuals
    xhat = _wide(x) * rstd
    g = g.astype(xhat.dtype)
    gw = g * _wide(weight)
    dx = rstd * (gw - xhat * jnp.mean(gw * xhat, axis=-1, keepdims=True))
    dbias = None if bias is None else _rows_sum(g, bias)
    return dx.astype(x.dtype), _rows_sum(g * xhat, weight), dbias


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# ---- the output gate on the per-head LayerNorm ----------------------------------------------------------------

def _head_statistics(h: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """h (..., DHV) -> (mean, rsqrt(variance + eps)), each (..., 1) float32 (biased variance)."""
    h = _wide(h)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True) + eps)


def _token_major(a: jax.Array) -> jax.Array:
    """(..., NH, S, DHV) -> (..., S, NH * DHV)."""
    a = jnp.swapaxes(a, -3, -2)
    return a.reshape(*a.shape[:-2], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def gated_head_norm(h: jax.Array, gate: jax.Array, weight: jax.Array, bias: jax.Array | None, eps: float,
                    out_dtype: Any) -> jax.Array:
    """h (..., NH, S, DHV) in the mLSTM cell's layout, gate (..., S, NH * DHV) -> sigmoid(gate) * (((h - mean)
    rsqrt(var + eps)) token-major and flattened * weight (+ bias)) (..., S, NH * DHV) in out_dtype, the statistics
    over each head's DHV; weight, bias (NH * DHV,). The backward keeps h (the cell's output as it is: no
    transposed copy), gate and two float32 statistics per head and token, and returns h's cotangent in h's layout."""
    return _gated_head_norm_fwd(h, gate, weight, bias, eps, out_dtype)[0]


def _gated_head_norm_fwd(h, gate, weight, bias, eps, out_dtype):
    mean, rstd = _head_statistics(h, eps)
    normed = _affine(_token_major((_wide(h) - mean) * rstd), weight, bias)
    return (jax.nn.sigmoid(_wide(gate)) * normed).astype(out_dtype), (h, gate, weight, bias, mean, rstd)


def _gated_head_norm_bwd(eps, out_dtype, residuals, g):
    h, gate, weight, bias, mean, rstd = residuals
    xhat = (_wide(h) - mean) * rstd  # (..., NH, S, DHV)
    flat = _token_major(xhat)
    sig = jax.nn.sigmoid(_wide(gate))
    g = g.astype(xhat.dtype)
    dgate = g * _affine(flat, weight, bias) * sig * (1.0 - sig)
    gn = g * sig  # the cotangent of the normalised, weighted h
    gx = gn * _wide(weight)  # (..., S, NH * DHV) -> the cell's layout
    gx = jnp.swapaxes(gx.reshape(*gx.shape[:-1], xhat.shape[-3], xhat.shape[-1]), -3, -2)
    dh = rstd * (gx - jnp.mean(gx, axis=-1, keepdims=True) - xhat * jnp.mean(gx * xhat, axis=-1, keepdims=True))
    dbias = None if bias is None else _rows_sum(gn, bias)
    return dh.astype(h.dtype), dgate.astype(gate.dtype), _rows_sum(gn * flat, weight), dbias


gated_head_norm.defvjp(_gated_head_norm_fwd, _gated_head_norm_bwd)


# ---- SwiGLU ---------------------------------------------------------------------------------------------------

def _gate_and_up(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z (..., 2F) -> its halves (..., F) in float32 (or z's dtype where wider)."""
    return jnp.split(_wide(z), 2, axis=-1)


def _swiglu_cotangents(gate: jax.Array, up: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Widened gate, up (..., F) and the output's cotangent g -> the cotangents of gate and up (widened)."""
    sig, g = jax.nn.sigmoid(gate), g.astype(gate.dtype)
    dgate = g * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))
    return dgate, g * gate * sig


@jax.custom_vjp
def swiglu(z: jax.Array) -> jax.Array:
    """z (..., 2F) = gate | up -> silu(gate) * up (..., F) in z's dtype, formed in float32 (or wider). Its backward
    reads z and writes the cotangent of z (gate | up) in one pass (autodiff of the split wrote the two halves apart
    and joined them)."""
    gate, up = _gate_and_up(z)
    return (jax.nn.silu(gate) * up).astype(z.dtype)


def _swiglu_fwd(z):
    return swiglu(z), z


def _swiglu_bwd(z, g):
    return (jnp.concatenate(_swiglu_cotangents(*_gate_and_up(z), g), axis=-1).astype(z.dtype),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def swiglu_pair(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`swiglu` of the halves as two arrays (the FFN of weight_mode "single"): gate, up (..., F) -> silu(gate) * up
    (..., F) in gate's dtype, formed in float32 (or wider). The backward keeps gate and up as they are (autodiff of
    the float32 form kept five float32 arrays of their size) and returns their cotangents in their dtypes."""
    return (jax.nn.silu(_wide(gate)) * _wide(up)).astype(gate.dtype)


def _swiglu_pair_fwd(gate, up):
    return swiglu_pair(gate, up), (gate, up)


def _swiglu_pair_bwd(residuals, g):
    gate, up = residuals
    dgate, dup = _swiglu_cotangents(_wide(gate), _wide(up), g)
    return dgate.astype(gate.dtype), dup.astype(up.dtype)


swiglu_pair.defvjp(_swiglu_pair_fwd, _swiglu_pair_bwd)
