"""Helpers for the xLSTM-7B model tests: tiny configs, randomised parameters, and an independent float64 numpy
forward pass of the architecture that reads torch-layout (HF-key) tensors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlstm_jax.models.xlstm_large.config import xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.model import xLSTMLarge


def tiny_config(**changes) -> xLSTMLargeConfig:
    """D 32, 2 heads (DHQK 8, DHV 16), 2 blocks, vocab 40, FFN 64, float32 compute, chunk 16."""
    base = dict(embedding_dim=32, num_heads=2, num_blocks=2, vocab_size=40, ffn_proj_factor=1.5,
                compute_dtype="float32", backend="native_chunkwise", chunk_size=16)
    return xLSTMLargeConfig(**{**base, **changes})


def random_model(config: xLSTMLargeConfig, seed: int = 0, scale: float = 0.3) -> xLSTMLarge:
    """A model whose every parameter is its initial value plus N(0, scale^2) noise, so gates, norms and the output
    gate all vary with the input (the zero / constant initialisations would hide mistakes)."""
    graphdef, state = nnx.split(xLSTMLarge(config, rngs=nnx.Rngs(seed)))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


def jitted(model: xLSTMLarge):
    """`model(tokens, **kwargs)` under one jax.jit (backend and return_states static): eager calls of the model
    re-trace every backend op and are much slower than one compilation."""
    graphdef, params = nnx.split(model)

    def run(params, tokens, states, segment_ids, token_mask, backend, return_states, last_logits_only):
        return nnx.merge(graphdef, params)(tokens, states=states, segment_ids=segment_ids, token_mask=token_mask,
                                           backend=backend, return_states=return_states,
                                           last_logits_only=last_logits_only)

    run = jax.jit(run, static_argnames=("backend", "return_states", "last_logits_only"))

    def call(tokens, *, states=None, segment_ids=None, token_mask=None, backend=None, return_states=False,
             last_logits_only=False):
        return run(params, jnp.asarray(tokens), states, segment_ids, token_mask, backend=backend,
                   return_states=return_states, last_logits_only=last_logits_only)

    return call


def random_tokens(seed: int, shape: tuple[int, int], vocab_size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _cap(x, cap):
    return x if cap is None else cap * np.tanh(x / cap)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def numpy_forward(t: dict[str, np.ndarray], c: xLSTMLargeConfig, tokens: np.ndarray) -> np.ndarray:
    """Float64 logits (B, S, V) from HF-key torch-layout tensors `t`, written straight from the spec: the mLSTM
    cell in its recurrent form with m_0 = 0, Linear weights applied as x @ W.T."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    NH, DHQK, DHV = c.num_heads, c.qk_head_dim, c.v_head_dim
    x = t["backbone.embeddings.weight"][tokens]
    B, S, _ = x.shape
    for b in range(c.num_blocks):
        p = f"backbone.blocks.{b}."
        h = _rms(x, t[p + "norm_mlstm.weight"], c.norm_eps)
        q = (h @ t[p + "mlstm_layer.q.weight"].T).reshape(B, S, NH, DHQK)
        k = (h @ t[p + "mlstm_layer.k.weight"].T).reshape(B, S, NH, DHQK)
        v = (h @ t[p + "mlstm_layer.v.weight"].T).reshape(B, S, NH, DHV)
        o = h @ t[p + "mlstm_layer.ogate_preact.weight"].T
        i = _cap(h @ t[p + "mlstm_layer.igate_preact.weight"].T + t[p + "mlstm_layer.igate_preact.bias"],
                 c.gate_soft_cap)
        f = _cap(h @ t[p + "mlstm_layer.fgate_preact.weight"].T + t[p + "mlstm_layer.fgate_preact.bias"],
                 c.gate_soft_cap)
        out = np.zeros((B, S, NH, DHV))
        for bb in range(B):
            for hh in range(NH):
                C, n, m = np.zeros((DHQK, DHV)), np.zeros(DHQK), 0.0
                for s in range(S):
                    lf = _log_sigmoid(f[bb, s, hh])
                    m_new = max(lf + m, i[bb, s, hh])
                    fb, ib = np.exp(lf + m - m_new), np.exp(i[bb, s, hh] - m_new)
                    C = fb * C + ib * np.outer(k[bb, s, hh], v[bb, s, hh])
                    n = fb * n + ib * k[bb, s, hh]
                    m = m_new
                    qs = q[bb, s, hh] / np.sqrt(DHQK)
                    out[bb, s, hh] = qs @ C / (max(abs(qs @ n), np.exp(-m)) + c.eps)
        centred = out - out.mean(-1, keepdims=True)
        normed = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + c.norm_eps)
        normed = normed.reshape(B, S, NH * DHV) * t[p + "mlstm_layer.multihead_norm.weight"]
        y = 1.0 / (1.0 + np.exp(-o)) * normed
        x = x + y @ t[p + "mlstm_layer.out_proj.weight"].T
        h2 = _rms(x, t[p + "norm_ffn.weight"], c.norm_eps)
        gate = h2 @ t[p + "ffn.proj_up_gate.weight"].T
        up = h2 @ t[p + "ffn.proj_up.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ t[p + "ffn.proj_down.weight"].T
    x = _rms(x, t["backbone.out_norm.weight"], c.norm_eps)
    return _cap(x @ t["lm_head.weight"].T, c.output_logit_soft_cap)
