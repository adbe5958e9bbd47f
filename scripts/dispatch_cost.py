"""Host time of handing a model's state to a jitted function and back: the training step's parameters and AdamW
state (nnx State trees in, the same trees out) and the serving engine's parameters, each as the nnx State the code
holds and as a flat list of its arrays. jit's dispatch flattens lists and tuples in C++ but an nnx Variable in
Python, one Variable at a time; the parameter structure (not its sizes) sets the cost, so the model here has the
real block count at a small width. The jitted function does nothing with the state, so the times are the host's.

    python scripts/dispatch_cost.py --blocks 12 24 32 --json dispatch_cost.json

Medians of `--rounds` rounds of `--calls` calls each, in microseconds a call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from xlstm_jax.models.xlstm_large.config import xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.model import xLSTMLarge


def per_call_us(fn, args, calls: int, rounds: int) -> float:
    """Median over `rounds` of the wall time of `calls` back-to-back calls of `fn(*args)`, per call (us)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def measure(blocks: int, calls: int, rounds: int) -> dict:
    config = xLSTMLargeConfig(embedding_dim=64, num_heads=2, num_blocks=blocks, vocab_size=256)
    _, params = nnx.split(xLSTMLarge(config, rngs=nnx.Rngs(0)))
    opt_state = optax.adamw(1e-3).init(params)
    x = jnp.zeros((4,))
    through = jax.jit(lambda state, x: (state, x + 1))  # the state in and out, as the train step returns it
    into = jax.jit(lambda state, x: x + 1)  # the state in only, as the serving steps take their parameters
    train_state, train_leaves = (params, opt_state), jax.tree.leaves((params, opt_state))
    return {
        "blocks": blocks,
        "train_arrays": len(train_leaves),
        "param_arrays": len(jax.tree.leaves(params)),
        "train_state_us": per_call_us(through, (train_state, x), calls, rounds),
        "train_flat_us": per_call_us(through, (train_leaves, x), calls, rounds),
        "params_state_us": per_call_us(into, (params, x), calls, rounds),
        "params_flat_us": per_call_us(into, (jax.tree.leaves(params), x), calls, rounds),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="+", type=int, default=[12, 24, 32])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    for blocks in args.blocks:
        row = measure(blocks, args.calls, args.rounds)
        rows.append(row)
        print(f"{blocks} blocks: train state ({row['train_arrays']} arrays) in and out {row['train_state_us']:,.0f} us "
              f"as nnx States, {row['train_flat_us']:,.0f} us as a list; parameters ({row['param_arrays']} arrays) in "
              f"{row['params_state_us']:,.0f} / {row['params_flat_us']:,.0f} us", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"jax": jax.__version__, "device": jax.devices()[0].device_kind, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
