"""Which XLA settings pay for xLSTM-7B decoding (issue 34, item 1): one model, one process, each setting compiled
into its own executable through `Lowered.compile(compiler_options=...)` (XLA's debug options per executable, so
no process restart per setting).

The timed program is a greedy decode loop of STEPS tokens (a `fori_loop` carrying the token and the states, as
`Generator` runs): ms per token = call time / STEPS, median of --reps runs after warm-up, at each batch size. A
setting XLA does not know (an option of another jaxlib) is reported as an error row, not a crash.

    python scripts/decode_flags.py --json flags.json            # GPU: xLSTM-7B architecture, random bf16 weights
    python scripts/decode_flags.py --tiny --settings base        # a tiny model on a CPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlstm_jax.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.generation import _carried
from xlstm_jax.models.xlstm_large.model import zero_states

STEPS = 16

# name -> XLA debug options (GPU names; see xla/debug_options_flags.cc of the jaxlib in use)
SETTINGS = {
    "base": {},
    "pdl": {"xla_gpu_enable_pdl": True},
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
    "cublaslt": {"xla_gpu_enable_cublaslt": True},
    "no_command_buffer": {"xla_gpu_enable_command_buffer": ""},
    "graph_min_1": {"xla_gpu_graph_min_graph_size": 1},
    "pdl+no_triton_gemm": {"xla_gpu_enable_pdl": True, "xla_gpu_enable_triton_gemm": False},
}


def decode_loop(graphdef, state_dtype):
    """(params, token (B,), states) -> (last token, states) after STEPS greedy steps, the states carried as
    `Generator` carries them (`_carried`)."""

    def run(params, token, states):
        model = nnx.merge(graphdef, params)

        def body(_, carry):
            tok, st = carry
            logits, st = model(tok[:, None], states=st, return_states=True, backend="mlstm_step")
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), _carried(st, state_dtype)

        return jax.lax.fori_loop(0, STEPS, body, (token, states))

    return run


def time_call(compiled, args, reps: int) -> float:
    """Median seconds of one call (after 2 untimed), the states fed back so nothing is copied."""
    token, states = args[1], args[2]
    for _ in range(2):
        token, states = compiled(args[0], token, states)
    jax.block_until_ready(token)
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        token, states = compiled(args[0], token, states)
        jax.block_until_ready((token, states))
        runs.append(time.perf_counter() - start)
    return float(np.median(runs))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    size = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=256) if args.tiny else {}
    dtype = "float32" if args.tiny else "bfloat16"
    config = xLSTMLargeConfig(**size, param_dtype=dtype, compute_dtype=dtype, weight_mode="fused")
    graphdef, params = nnx.split(xLSTMLarge(config, rngs=nnx.Rngs(0)))
    run = jax.jit(decode_loop(graphdef, args.state_dtype), donate_argnums=(2,))
    rows = []
    for B in args.batches:
        def fresh():
            return params, jnp.zeros((B,), jnp.int32), _carried(zero_states(config, B), args.state_dtype)

        lowered = run.lower(*fresh())
        for name in args.settings:
            row = {"B": B, "setting": name, "options": SETTINGS[name]}
            try:
                began = time.perf_counter()
                compiled = lowered.compile(compiler_options=SETTINGS[name] or None)
                row["compile_s"] = time.perf_counter() - began
                seconds = time_call(compiled, fresh(), args.reps) / STEPS
                row.update(ms_per_token=1e3 * seconds, tokens_per_s=B / seconds)
                print(f"B={B:3d} {name:22s} {1e3 * seconds:7.3f} ms/token {B / seconds:9,.0f} tok/s "
                      f"(compile {row['compile_s']:.1f} s)", flush=True)
            except Exception as error:  # an option this jaxlib does not know, or one it cannot compile with
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                print(f"B={B:3d} {name:22s} error: {row['error']}", flush=True)
            rows.append(row)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "state_dtype": args.state_dtype,
              "steps": STEPS, "rows": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
