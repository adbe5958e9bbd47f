"""Time the Triton families through `xlstm_jax.mlstm` (fw and fw+bw), the model's mLSTM cell and its mLSTM layer
forward for both input gates, for whichever `xlstm_jax` is first on the path: run it once per checkout to compare two commits on one
machine (docs/benchmarks.md, "One door"). One JSON line per case on stdout.

    PYTHONPATH=OLD_CHECKOUT python scripts/cell_speed.py --label before
    PYTHONPATH=. python scripts/cell_speed.py --label after
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import xlstm_jax
from xlstm_jax.models.xlstm_large.config import xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.model import mLSTMLayer


def median_ms(fn, args, reps: int) -> float:
    """Median wall time of `fn(*args)` in ms over `reps` calls, after two warm-up calls (compilation)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def family_cases(reps: int):
    """Both families at the 16-head training shape, bf16, chunk 64: fw and fw+bw."""
    B, NH, S, DHQK, DHHV = 8, 16, 8192, 128, 256
    keys = jax.random.split(jax.random.key(0), 5)
    q, k = (jax.random.normal(key, (B, NH, S, DHQK), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (B, NH, S, DHHV), jnp.bfloat16)
    i = jax.random.normal(keys[3], (B, NH, S), jnp.float32)
    f = 3.0 + jax.random.normal(keys[4], (B, NH, S), jnp.float32)
    for backend in ("triton_limit_chunk", "triton_xl_chunk"):
        def fw(q, k, v, i, f, backend=backend):
            return xlstm_jax.mlstm(q, k, v, i, f, backend=backend, chunk_size=64)

        def loss(q, k, v, i, f, backend=backend):
            return jnp.sum(fw(q, k, v, i, f, backend).astype(jnp.float32))

        yield dict(case=backend, shape=[B, NH, S, DHQK, DHHV], fw_ms=median_ms(jax.jit(fw), (q, k, v, i, f), reps),
                   fwbw_ms=median_ms(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), (q, k, v, i, f), reps))


def _model_cell(config: xLSTMLargeConfig):
    """The cell call of the model's mLSTM layer, as this checkout's model makes it: through the op's door
    (`dispatch`, the input gate passed on), or, before it, through the documented backend layer with the model's own
    sigmoid transform."""
    try:
        from xlstm_jax.kernels.base import validated
        from xlstm_jax.mlstm.api import MLSTMCall, dispatch
    except ImportError:
        from xlstm_jax.mlstm import input_gates
        from xlstm_jax.models.xlstm_large.model import mlstm_cell

        cell = mlstm_cell(config, "triton_limit_chunk", 64)

        def before(q, k, v, i, f):
            if config.input_gate == "sigmoid":
                i, _ = input_gates.as_exp_gate(i, None)
            h, states = cell(q, k, v, i, f, return_last_states=True)
            return (h, input_gates.true_states(states)) if config.input_gate == "sigmoid" else (h, states)

        return before

    def door(q, k, v, i, f):
        x, o = validated(q, k, v, i, f, return_last_states=True, eps=config.eps)
        return dispatch(MLSTMCall(x, o, "triton_limit_chunk", 64, input_gate=config.input_gate))

    return door


def cell_cases(reps: int):
    """The model's cell forward with last states at the 7B heads (B=4, NH=8, S=4096, 256/512, bf16), for both input
    gates."""
    B, NH, S, DHQK, DHHV = 4, 8, 4096, 256, 512
    keys = jax.random.split(jax.random.key(2), 5)
    q, k = (jax.random.normal(key, (B, NH, S, DHQK), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (B, NH, S, DHHV), jnp.bfloat16)
    i, f = (jax.random.normal(key, (B, NH, S), jnp.float32) for key in keys[3:])
    for gate in ("exp", "sigmoid"):
        c = xLSTMLargeConfig(embedding_dim=4096, num_heads=NH, num_blocks=1, vocab_size=64, input_gate=gate)
        yield dict(case=f"cell_{gate}", shape=[B, NH, S, DHQK, DHHV],
                   fw_ms=median_ms(jax.jit(_model_cell(c)), (q, k, v, i, f + 3.0), reps))


def layer_cases(reps: int):
    """The model's mLSTM layer forward (projections, gates, cell, norm, output) at the 7B heads (NH 8, 256/512),
    D=4096, B=4, S=4096, bf16 compute, for the exponential and the sigmoid input gate."""
    for gate in ("exp", "sigmoid"):
        c = xLSTMLargeConfig(embedding_dim=4096, num_heads=8, num_blocks=1, vocab_size=64, chunk_size=64,
                             input_gate=gate, compute_dtype="bfloat16")
        layer = mLSTMLayer(c, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(layer)
        x = jax.random.normal(jax.random.key(1), (4, 4096, 4096), jnp.float32)

        def fw(params, x):
            return nnx.merge(graphdef, params)(x, state=None, reset=None, token_mask=None,
                                               backend="triton_limit_chunk", chunk_size=64)[0]

        yield dict(case=f"layer_{gate}", fw_ms=median_ms(jax.jit(fw), (params, x), reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    root = xlstm_jax.__file__.rsplit("/xlstm_jax/", 1)[0]
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    for row in (*family_cases(args.reps), *cell_cases(args.reps), *layer_cases(args.reps)):
        print(json.dumps(dict(label=args.label, commit=commit, device=jax.devices()[0].device_kind, **row)),
              flush=True)


if __name__ == "__main__":
    main()
