"""The xLSTM-7B language model in Flax NNX on the `xlstm_jax.mlstm` backends.

Module and parameter names mirror the torch/HF state dict (`backbone.blocks.3.mlstm_layer.q.kernel` <->
`backbone.blocks.3.mlstm_layer.q.weight`), so checkpoint conversion is a rename plus a transpose of Dense kernels.
Shapes: B batch, S sequence, D embedding_dim, NH heads, DHQK / DHV head dims, F FFN width, V vocab.

Sharding: every matrix carries logical axis names (Flax NNX sharding metadata, `nnx.get_partition_spec`): "embed"
(D), "heads" (the q/k/v/gate and output-gate columns, the mLSTM output projection's rows), "ffn" (F), "vocab" (V);
fused weights (weight_mode "fused") name only "embed", since their columns mix q, k, v and o. `xlstm_jax.train.mesh`
maps the names to mesh axes.

Precision: parameters in `param_dtype` (float32); matmul operands in `compute_dtype` with float32 accumulation;
the residual stream, norm statistics, gate pre-activations, mLSTM states and logits are float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlstm_jax.kernels.base import NEUTRAL_FGATE, NEUTRAL_IGATE, validated
from xlstm_jax.mlstm.api import MLSTMCall, dispatch, planned_backend
from xlstm_jax.mlstm.prefill import mlstm_prefill
from xlstm_jax.mlstm.segments import document_starts
from xlstm_jax.mlstm.step import mlstm_step
from xlstm_jax.models.xlstm_large.config import PREFILL_BACKEND, STEP_BACKEND, xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.fused import gated_head_norm, rms_norm, swiglu, swiglu_pair
from xlstm_jax.models.xlstm_large.mixed_matmul import mixed_matmul

F32 = jnp.float32
State = tuple[jax.Array, jax.Array, jax.Array]  # C (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH); float32
# What a rematerialised block keeps for the backward (`xLSTMLarge.__call__`'s remat): None, only its input
REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _normal(std: float) -> Callable[..., jax.Array]:
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def _projection_inits(c: xLSTMLargeConfig) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """The "small" init of input projections (std sqrt(2 / 5D)) and Wang's init of output projections
    (std 2 / (num_blocks sqrt(D)))."""
    D = c.embedding_dim
    return _normal(float(np.sqrt(2.0 / (5.0 * D)))), _normal(2.0 / (c.num_blocks * float(np.sqrt(D))))


def _constant(values: Any) -> Callable[..., jax.Array]:
    return lambda key, shape, dtype: jnp.broadcast_to(jnp.asarray(values, dtype), shape)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel (in, out) with logical axis names `axes`, in the parameter dtype, operands cast
    to the compute dtype, float32 accumulation and the result in `out_dtype` (default float32); the backward's
    matmuls in the compute dtype too (`mixed_matmul`)."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None], use_bias: bool,
                 kernel_init, bias_init=None, param_dtype: Any, rngs: nnx.Rngs):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                                sharding_names=axes, eager_sharding=False)
        init = bias_init or _constant(0.0)
        self.bias = nnx.Param(init(rngs.params(), (out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array, dtype: Any, out_dtype: Any = F32) -> jax.Array:
        if self.bias is None:
            return mixed_matmul(x, self.kernel[...], dtype, out_dtype=out_dtype)
        return (mixed_matmul(x, self.kernel[...], dtype) + self.bias[...].astype(F32)).astype(out_dtype)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * weight (+ bias) over the last axis, formed in float32, in `out_dtype` (the
    model's norms: the compute dtype their projections cast to; `fused.rms_norm`)."""

    def __init__(self, dim: int, *, eps: float, use_bias: bool, param_dtype: Any, out_dtype: Any = F32):
        self.eps, self.out_dtype = eps, jnp.dtype(out_dtype)
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], None if self.bias is None else self.bias[...], self.eps, self.out_dtype)


class MultiHeadLayerNorm(nnx.Module):
    """Per-head LayerNorm over DHV (mean subtracted, biased variance, float32), then a flat (NH * DHV) weight, and
    the mLSTM layer's sigmoid output gate on it (`fused.gated_head_norm`).

    h (B, NH, S, DHV) (the cell's layout), gate (B, S, NH * DHV) -> sigmoid(gate) * norm(h) (B, S, NH * DHV) in
    out_dtype."""

    def __init__(self, num_heads: int, head_dim: int, *, eps: float, use_bias: bool, param_dtype: Any):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((num_heads * head_dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_heads * head_dim,), param_dtype)) if use_bias else None

    def __call__(self, h: jax.Array, gate: jax.Array, out_dtype: Any = F32) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return gated_head_norm(h, gate, self.weight[...], bias, self.eps, jnp.dtype(out_dtype))


class mLSTMLayer(nnx.Module):
    """q/k/v/o projections, per-head soft-capped input and forget gates, the mLSTM cell on a backend, per-head norm,
    sigmoid output gate and out projection. weight_mode "fused" concatenates q|k|v|o, i|f and
    (in the FFN) gate|up into one Dense each; the math is identical."""

    def __init__(self, config: xLSTMLargeConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        D, NH, pdt, bias = c.embedding_dim, c.num_heads, c.param_jnp_dtype, c.use_bias
        small, wang = _projection_inits(c)
        zeros = _constant(0.0)
        f_bias = np.linspace(*c.fgate_bias_init_range, NH)
        cols, fused = ("embed", "heads"), ("embed", None)
        if c.weight_mode == "single":
            self.q = Dense(D, c.qk_dim, axes=cols, use_bias=bias, kernel_init=small, param_dtype=pdt, rngs=rngs)
            self.k = Dense(D, c.qk_dim, axes=cols, use_bias=bias, kernel_init=small, param_dtype=pdt, rngs=rngs)
            self.v = Dense(D, c.v_dim, axes=cols, use_bias=bias, kernel_init=small, param_dtype=pdt, rngs=rngs)
            self.ogate_preact = Dense(D, c.v_dim, axes=cols, use_bias=bias, kernel_init=zeros, param_dtype=pdt,
                                      rngs=rngs)
            self.igate_preact = Dense(D, NH, axes=cols, use_bias=True, kernel_init=zeros,
                                      bias_init=_constant(c.igate_bias_init), param_dtype=pdt, rngs=rngs)
            self.fgate_preact = Dense(D, NH, axes=cols, use_bias=True, kernel_init=zeros, bias_init=_constant(f_bias),
                                      param_dtype=pdt, rngs=rngs)
        else:
            def qkvo_init(key, shape, dtype):
                keys = jax.random.split(key, 3)
                parts = [small(keys[0], (D, c.qk_dim), dtype), small(keys[1], (D, c.qk_dim), dtype),
                         small(keys[2], (D, c.v_dim), dtype), jnp.zeros((D, c.v_dim), dtype)]
                return jnp.concatenate(parts, axis=1)

            if_bias = np.concatenate([np.full(NH, c.igate_bias_init), f_bias])
            self.qkv_opreact = Dense(D, 2 * c.qk_dim + 2 * c.v_dim, axes=fused, use_bias=bias, kernel_init=qkvo_init,
                                     param_dtype=pdt, rngs=rngs)
            self.ifgate_preact = Dense(D, 2 * NH, axes=fused, use_bias=True, kernel_init=zeros,
                                       bias_init=_constant(if_bias),
                                       param_dtype=pdt, rngs=rngs)
        self.multihead_norm = MultiHeadLayerNorm(NH, c.v_head_dim, eps=c.norm_eps, use_bias=bias, param_dtype=pdt)
        self.out_proj = Dense(c.v_dim, D, axes=("heads", "embed"), use_bias=bias, kernel_init=wang, param_dtype=pdt,
                              rngs=rngs)

    @jax.named_scope("project")
    def project(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """x (B, S, D) (normed; cast to the compute dtype, or float32 for the gates) -> q, k (B, S, NH * DHQK), v, o
        (B, S, NH * DHV) in the compute dtype, and the soft-capped gate pre-activations i, f (B, S, NH) float32.
        Per token: rows of x may be any tokens."""
        c = self.config
        dt = c.compute_jnp_dtype
        if c.weight_mode == "single":
            q, k, v, o = (proj(x, dt, dt) for proj in (self.q, self.k, self.v, self.ogate_preact))
            i = soft_cap(self.igate_preact(x, F32), c.gate_soft_cap)
            f = soft_cap(self.fgate_preact(x, F32), c.gate_soft_cap)
        else:
            q, k, v, o = jnp.split(self.qkv_opreact(x, dt, dt), np.cumsum([c.qk_dim, c.qk_dim, c.v_dim]), axis=-1)
            i, f = jnp.split(soft_cap(self.ifgate_preact(x, F32), c.gate_soft_cap), 2, axis=-1)
        return q, k, v, o, i, f

    @jax.named_scope("mlstm_cell")
    def cell(self, q: jax.Array, k: jax.Array, v: jax.Array, i: jax.Array, f: jax.Array, state: State | None, *,
             backend: str, chunk_size: int | None, sequence_axis_name: Any = None, mesh_axes: Any = None
             ) -> tuple[jax.Array, State]:
        """The mLSTM cell on `project`'s outputs (B, S, ...) from `state` (None: zeros): h (B, NH, S, DHV) in the
        compute dtype (the kernels' layout, which `output` takes) and the last state. backend "mlstm_step" runs one
        token (S = 1) through `mlstm_step`, "mlstm_prefill" a short chunk forward only through `mlstm_prefill`."""
        c = self.config
        B, S, _ = q.shape
        NH, DHQK, DHV, dt = c.num_heads, c.qk_head_dim, c.v_head_dim, c.compute_jnp_dtype

        def heads(a: jax.Array, dh: int) -> jax.Array:
            return a.astype(dt).reshape(B, S, NH, dh).transpose(0, 2, 1, 3)

        if backend == STEP_BACKEND:
            h, new_state = mlstm_step(heads(q, DHQK)[:, :, 0], heads(k, DHQK)[:, :, 0], heads(v, DHV)[:, :, 0],
                                      i[:, 0], f[:, 0], *(state or (None,) * 3), eps=c.eps, input_gate=c.input_gate)
            return h[:, :, None], new_state
        if backend == PREFILL_BACKEND:
            h, new_state = mlstm_prefill(heads(q, DHQK), heads(k, DHQK), heads(v, DHV), i.transpose(0, 2, 1),
                                         f.transpose(0, 2, 1), *(state or (None,) * 3), eps=c.eps,
                                         input_gate=c.input_gate)
            return h, new_state
        cell, options = validated(heads(q, DHQK), heads(k, DHQK), heads(v, DHV), i.transpose(0, 2, 1),
                                  f.transpose(0, 2, 1), *(state or (None,) * 3), return_last_states=True, eps=c.eps)
        h, new_state = dispatch(MLSTMCall(cell, options, backend, chunk_size, input_gate=c.input_gate,
                                          sequence_axis_name=sequence_axis_name, mesh_axes=mesh_axes))
        return h, new_state

    @jax.named_scope("output")
    def output(self, h: jax.Array, o: jax.Array) -> jax.Array:
        """h (B, NH, S, DHV), o (B, S, NH * DHV) -> out_proj(sigmoid(o) * norm(h)) (B, S, D) float32."""
        dt = self.config.compute_jnp_dtype
        return self.out_proj(self.multihead_norm(h, o, dt), dt)

    def __call__(self, x: jax.Array, *, state: State | None, reset: jax.Array | None, token_mask: jax.Array | None,
                 backend: str, chunk_size: int | None, sequence_axis_name: Any = None, mesh_axes: Any = None
                 ) -> tuple[jax.Array, State]:
        """x (B, S, D) (normed, any float dtype) -> (y (B, S, D) float32, last state)."""
        c = self.config
        q, k, v, o, i, f = self.project(x)
        if reset is not None:  # (B, S) document starts: -inf is the exact reset (xlstm_jax.mlstm.segments)
            value = -jnp.inf if c.document_reset == "exact" else c.reset_fgate_value
            f = jnp.where(reset[..., None], jnp.asarray(value, F32), f)
        if token_mask is not None:
            i, f = neutral_where_masked(i, f, token_mask)
        h, new_state = self.cell(q, k, v, i, f, state, backend=backend, chunk_size=chunk_size,
                                 sequence_axis_name=sequence_axis_name, mesh_axes=mesh_axes)
        return self.output(h, o), new_state


def neutral_where_masked(i: jax.Array, f: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gate pre-activations i, f (..., NH) with neutral values where `token_mask` (...) is False (those tokens
    leave the states exactly unchanged)."""
    return (jnp.where(token_mask[..., None], i, NEUTRAL_IGATE), jnp.where(token_mask[..., None], f, NEUTRAL_FGATE))


class FeedForward(nnx.Module):
    """SwiGLU: (silu(x W_gate) * (x W_up)) W_down; the gate and up projections and their product (formed in float32)
    in the compute dtype, as W_down's matmul takes it (its gradient then comes back in that dtype too)."""

    def __init__(self, config: xLSTMLargeConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        D, F, pdt, bias = c.embedding_dim, c.ffn_dim, c.param_jnp_dtype, c.use_bias
        small, wang = _projection_inits(c)
        up = dict(use_bias=bias, kernel_init=small, param_dtype=pdt, rngs=rngs)
        if c.weight_mode == "single":
            self.proj_up_gate = Dense(D, F, axes=("embed", "ffn"), **up)
            self.proj_up = Dense(D, F, axes=("embed", "ffn"), **up)
        else:
            self.proj_up_gate_z = Dense(D, 2 * F, axes=("embed", None), **up)
        self.proj_down = Dense(F, D, axes=("ffn", "embed"), use_bias=bias, kernel_init=wang, param_dtype=pdt, rngs=rngs)

    @jax.named_scope("ffn")
    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.config.compute_jnp_dtype
        if self.config.weight_mode == "single":
            return self.proj_down(swiglu_pair(self.proj_up_gate(x, dt, dt), self.proj_up(x, dt, dt)), dt)
        return self.proj_down(swiglu(self.proj_up_gate_z(x, dt, dt)), dt)


class mLSTMBlock(nnx.Module):
    """x + mLSTM(RMSNorm(x)), then x + FFN(RMSNorm(x)) (pre-norm, two residual branches)."""

    def __init__(self, config: xLSTMLargeConfig, *, rngs: nnx.Rngs):
        c = config
        norm = dict(eps=c.norm_eps, use_bias=c.use_bias, param_dtype=c.param_jnp_dtype, out_dtype=c.compute_jnp_dtype)
        self.norm_mlstm = RMSNorm(c.embedding_dim, **norm)
        self.mlstm_layer = mLSTMLayer(c, rngs=rngs)
        self.norm_ffn = RMSNorm(c.embedding_dim, **norm)
        self.ffn = FeedForward(c, rngs=rngs)

    def __call__(self, x: jax.Array, state: State | None = None, **kwargs: Any) -> tuple[jax.Array, State]:
        y, state = self.mlstm_layer(self.norm_mlstm(x), state=state, **kwargs)
        x = x + y
        return x + self.ffn(self.norm_ffn(x)), state


class Embedding(nnx.Module):
    """Token embedding table `weight` (V, D)."""

    def __init__(self, vocab_size: int, dim: int, *, param_dtype: Any, rngs: nnx.Rngs):
        std = float(np.sqrt(2.0 / (5.0 * dim)))
        self.weight = nnx.Param(_normal(std)(rngs.params(), (vocab_size, dim), param_dtype),
                                sharding_names=("vocab", "embed"), eager_sharding=False)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0).astype(F32)


class xLSTMBackbone(nnx.Module):
    """Embedding, the block stack and the optional final RMSNorm."""

    def __init__(self, config: xLSTMLargeConfig, *, rngs: nnx.Rngs):
        c = config
        self.embeddings = Embedding(c.vocab_size, c.embedding_dim, param_dtype=c.param_jnp_dtype, rngs=rngs)
        self.blocks = nnx.List([mLSTMBlock(c, rngs=rngs) for _ in range(c.num_blocks)])
        self.out_norm = (
            RMSNorm(c.embedding_dim, eps=c.norm_eps, use_bias=c.use_bias, param_dtype=c.param_jnp_dtype,
                    out_dtype=c.compute_jnp_dtype)
            if c.add_out_norm else None
        )


def _check_2d(x: Any, name: str, shape: tuple[int, ...] | None = None) -> None:
    if np.ndim(x) != 2:
        raise ValueError(f"{name} must be 2-D (B, S), got shape {tuple(np.shape(x))}.")
    if shape is not None and tuple(np.shape(x)) != shape:
        raise ValueError(f"{name} must have the shape of tokens {shape}, got shape {tuple(np.shape(x))}.")


class xLSTMLarge(nnx.Module):
    """The xLSTM-7B language model for any `xLSTMLargeConfig`.

    `model(tokens)` maps int tokens (B, S) to float32 logits (B, S, V). See `__call__` for states, packed
    documents and padding.
    """

    def __init__(self, config: xLSTMLargeConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = xLSTMBackbone(config, rngs=rngs)
        std = float(np.sqrt(2.0 / (5.0 * config.embedding_dim)))
        self.lm_head = (
            Dense(config.embedding_dim, config.vocab_size, axes=("embed", "vocab"), use_bias=False,
                  kernel_init=_normal(std),
                  param_dtype=config.param_jnp_dtype, rngs=rngs)
            if not config.tie_word_embeddings else None
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        states: list[State] | None = None,
        segment_ids: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        return_states: bool = False,
        backend: str | None = None,
        chunk_size: int | None = None,
        sequence_axis_name: Any = None,
        mesh_axes: Any = None,
        remat: bool | str = False,
        last_logits_only: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, list[State]]:
        """Logits of every position (or of the last one).

        tokens (B, S) int. states: one (C, n, m) float32 per block to continue from (None: zeros).
        segment_ids (B, S) int: packed documents, a new one wherever the id changes. `config.document_reset`
        "exact": each document runs as if alone (the first from `states`; `xlstm_jax.mlstm.segments`);
        "forget_gate": the forget gate is set to `config.reset_fgate_value` at each document start, position 0
        included (the upstream approximation, for checkpoints trained with it).
        token_mask (B, S) bool: False marks padding steps, given neutral gates so they leave the states exactly
        unchanged (left padding of batched prompts); their logits are meaningless.
        backend / chunk_size override the config's; backend "mlstm_step" runs one token (S = 1) through
        `xlstm_jax.mlstm_step`, "mlstm_prefill" a chunk of S = 16..512 (a power of two) forward only through
        `mlstm_prefill` (serving). sequence_axis_name: inside shard_map with the sequence split
        along that mesh axis, the mLSTM layers run context-parallel (`xlstm_jax.mlstm`) and document starts look
        across shard borders; the last states are those after the whole sequence. mesh_axes: under `jax.set_mesh`
        on a mesh with Auto axes, the mesh axes (B, NH, S) the mLSTM cells split their inputs over (a split S runs
        context-parallel; `xlstm_jax.mlstm`); the rest of the model is left to XLA's sharding propagation. remat
        (`REMAT_POLICIES`): "block" (or True) keeps only each block's input for the backward and recomputes the
        block there (activation memory of one block instead of all, for about one more forward pass); "dots" keeps
        the outputs of the matmuls without batch dimensions (the projections) and recomputes the rest (norms, gates,
        activations, the mLSTM cell); "none" (or False) recomputes nothing. Returns logits (B, S, V) float32 (B, 1,
        V: the last position's only, with `last_logits_only`, as a prompt pass before generation needs), or with
        `return_hidden` the last block's output (B, S, D) float32 instead (`head` maps it to the logits,
        `head_operands` to a fused loss's inputs), and with `return_states` also the last states (one (C, n, m)
        per block).
        """
        c = self.config
        if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise TypeError(f"tokens must be an integer array (B, S), got dtype {jnp.result_type(tokens)}.")
        _check_2d(tokens, "tokens")
        shape = tuple(np.shape(tokens))
        reset = None
        if segment_ids is not None:
            _check_2d(segment_ids, "segment_ids", shape)
            reset = document_starts(jnp.asarray(segment_ids), sequence_axis_name,
                                    first=c.document_reset == "forget_gate")
        if token_mask is not None:
            _check_2d(token_mask, "token_mask", shape)
            token_mask = jnp.asarray(token_mask, bool)
        if states is not None and len(states) != c.num_blocks:
            raise ValueError(f"states must hold one (C, n, m) per block ({c.num_blocks}), got {len(states)}.")
        if backend == STEP_BACKEND:
            if shape[1] != 1:
                raise ValueError(f"backend {STEP_BACKEND!r} runs one token per call (S = 1), got S = {shape[1]}.")
            name, chunk_size = backend, None
        elif backend == PREFILL_BACKEND:
            name, chunk_size = backend, None
        else:
            name, chunk_size = planned_backend(backend or c.backend, chunk_size or c.chunk_size,
                                               None if sequence_axis_name else shape[1])

        run_block = functools.partial(mLSTMBlock.__call__, reset=reset, token_mask=token_mask, backend=name,
                                      chunk_size=chunk_size, sequence_axis_name=sequence_axis_name,
                                      mesh_axes=mesh_axes)  # (block, x, state) -> (x, state)

        if isinstance(remat, bool):
            remat = "block" if remat else "none"
        if remat not in ("none", *REMAT_POLICIES):
            raise ValueError(f"remat must be one of {['none', *REMAT_POLICIES]} or a bool, got {remat!r}.")
        if remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[remat])
        x = self.backbone.embeddings(jnp.asarray(tokens))
        new_states = []
        for index, block in enumerate(self.backbone.blocks):
            x, state = run_block(block, x, None if states is None else states[index])
            new_states.append(state)
        x = x[:, -1:] if last_logits_only else x
        out = x if return_hidden else self.head(x)
        return (out, new_states) if return_states else out

    @jax.named_scope("head")
    def head(self, x: jax.Array) -> jax.Array:
        """The last block's output x (..., D) float32 -> soft-capped logits (..., V) float32 (the final norm, then
        the LM head or the tied embedding)."""
        c = self.config
        if self.backbone.out_norm is not None:
            x = self.backbone.out_norm(x)
        dt = c.compute_jnp_dtype
        if self.lm_head is None:
            logits = mixed_matmul(x, self.backbone.embeddings.weight[...], dt, w_layout="nk")
        else:
            logits = self.lm_head(x, dt)
        return soft_cap(logits, c.output_logit_soft_cap)

    def head_operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The last block's output x (..., D) float32 -> (the final norm's output (..., D) in the compute dtype,
        the LM head as a (V, D) matrix in the parameter dtype: the tied embedding, or the head's kernel transposed).
        `head(x)` is soft_cap(norm @ W^T) with compute-dtype operands; `xlstm_jax.train.losses` computes its loss
        from them."""
        if self.backbone.out_norm is not None:
            x = self.backbone.out_norm(x)
        weight = self.backbone.embeddings.weight[...] if self.lm_head is None else self.lm_head.kernel[...].T
        return x, weight


def zero_states(config: xLSTMLargeConfig, batch_size: int) -> list[State]:
    """Float32 zero states (m = 0) for every block: the state before any token."""
    NH, DHQK, DHV = config.num_heads, config.qk_head_dim, config.v_head_dim
    return [
        (jnp.zeros((batch_size, NH, DHQK, DHV), F32), jnp.zeros((batch_size, NH, DHQK), F32),
         jnp.zeros((batch_size, NH), F32))
        for _ in range(config.num_blocks)
    ]
