"""Weight-only int8 / float8 e4m3 decoding: `quantize(model, "int8" | "fp8")` returns a copy of an `xLSTMLarge` whose
projection matrices are `QuantizedDense` layers (the weight in 8 bits with one float32 scale per output channel,
`xlstm_jax.kernels.quantized_matmul`), half the bytes a decode step streams at bf16.

Quantized: every block's q/k/v/o (or fused qkv_opreact) and out projections, the FFN's up / gate / down
projections, and the LM head (`lm_head=True`, the default: docs/precision.md measures its effect). Kept as they
are: the embedding (a gather of one row per token costs no bandwidth worth saving, and its error would reach
every input), the gate pre-activation projections (D x NH: a few KB), norm weights and biases. A tied LM head is
the embedding and stays as well. Activations and everything after each matmul are unchanged: a `QuantizedDense`
computes what a `Dense` holding the dequantized weight computes (bit for bit on the XLA path).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from xlstm_jax.kernels.quantized_matmul import BACKENDS, check_scheme, dequantize, quantize_weight, quantized_matmul
from xlstm_jax.models.xlstm_large.model import Dense, xLSTMLarge

F32 = jnp.float32
# submodule -> its projection attributes (weight_mode "single" and "fused" names); the gate pre-activations
# (igate_preact, fgate_preact, ifgate_preact) are left out on purpose
PROJECTIONS = {
    "mlstm_layer": ("q", "k", "v", "ogate_preact", "qkv_opreact", "out_proj"),
    "ffn": ("proj_up_gate", "proj_up", "proj_up_gate_z", "proj_down"),
}


class QuantizedWeight(nnx.Variable):
    """An 8-bit weight or its scales: not an `nnx.Param` (nothing trains or exports it)."""


class QuantizedDense(nnx.Module):
    """`Dense`'s call with the weight held as wq (in, out) int8 / float8_e4m3fn and scale (out,) float32:
    y = x @ (wq * scale) (+ bias), float32 result, through `quantized_matmul` (`backend`: "auto", "xla",
    "triton")."""

    def __init__(self, dense: Dense, scheme: str, backend: str):
        wq, scale = quantize_weight(dense.kernel[...], scheme)
        sharding = dense.kernel.get_metadata().get("out_sharding")
        self.scheme = scheme
        self.backend = backend
        self.weight = QuantizedWeight(wq, **({"out_sharding": sharding, "eager_sharding": False} if sharding else {}))
        self.scale = QuantizedWeight(scale)
        self.bias = dense.bias

    def __call__(self, x: jax.Array, dtype: Any, out_dtype: Any = F32) -> jax.Array:
        if self.bias is None:
            return quantized_matmul(x.astype(dtype), self.weight[...], self.scale[...], backend=self.backend,
                                    out_dtype=out_dtype)
        y = quantized_matmul(x.astype(dtype), self.weight[...], self.scale[...], backend=self.backend, out_dtype=F32)
        return (y + self.bias[...].astype(F32)).astype(out_dtype)


def quantized_scheme(model: xLSTMLarge) -> str | None:
    """The scheme of a model's `QuantizedDense` layers, or None for a model with float weights."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedDense):
            return node.scheme
    return None


def _projections(model: xLSTMLarge, lm_head: bool) -> list[tuple[nnx.Module, str]]:
    """(parent module, attribute) of every projection `quantize` replaces."""
    found = [(getattr(block, part), name) for block in model.backbone.blocks for part, names in PROJECTIONS.items()
             for name in names if hasattr(getattr(block, part), name)]
    return found + ([(model, "lm_head")] if lm_head and model.lm_head is not None else [])


def quantize(model: xLSTMLarge, scheme: str, *, lm_head: bool = True, backend: str = "auto") -> xLSTMLarge:
    """A copy of `model` with weight-only quantized projections (see the module docstring); `model` is unchanged
    (the copy shares its other arrays). scheme "int8" or "fp8" (e4m3); lm_head: quantize the LM head too; backend:
    the matmul of the quantized layers ("auto": the dequantizing Triton kernel for decode steps of at most 16 rows
    on a CUDA GPU, XLA otherwise). Any weight mode and parameter dtype. ValueError for an unknown scheme or
    backend, a model that is not an `xLSTMLarge`, or one already quantized.
    """
    check_scheme(scheme)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.")
    if not isinstance(model, xLSTMLarge):
        raise ValueError(f"quantize takes an xLSTMLarge model, got {type(model).__name__}.")
    done = quantized_scheme(model)
    if done is not None:
        raise ValueError(f"the model's weights are already quantized ({done!r}); quantize the float model once.")
    out = nnx.clone(model)
    for parent, name in _projections(out, lm_head):
        setattr(parent, name, QuantizedDense(getattr(parent, name), scheme, backend))
    return out


def dequantized(model: xLSTMLarge) -> xLSTMLarge:
    """A float copy of a quantized model: every `QuantizedDense` back as a `Dense` holding wq * scale in the
    config's parameter dtype, what the quantized model computes with (for tests and quality measurements)."""
    out = nnx.clone(model)
    dtype = model.config.param_jnp_dtype
    for parent, name in _projections(out, lm_head=True):
        layer = getattr(parent, name)
        if isinstance(layer, QuantizedDense):
            w = dequantize(layer.weight[...], layer.scale[...]).astype(dtype)
            bias = layer.bias
            setattr(parent, name, Dense(*w.shape, axes=(None, None), use_bias=bias is not None,
                                        kernel_init=lambda *_, w=w: w,
                                        bias_init=None if bias is None else lambda *_, b=bias: b[...],
                                        param_dtype=dtype, rngs=nnx.Rngs(0)))
    return out
