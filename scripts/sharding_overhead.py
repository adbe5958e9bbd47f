"""Overhead of the sharded call paths on a 1-device mesh (issue 17): the plain call, inputs sharded over B under
jit (custom_partitioning of the Triton core), and `sequence_axis_name` inside shard_map, fw and fw+bw, medians.

    python3 scripts/sharding_overhead.py [--shape B,NH,S,DHQK,DHHV] [--backends ...] [--reps 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import xlstm_jax
from xlstm_jax.bench.measure import time_jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,16,8192,128,256")
    parser.add_argument("--backends", default="triton_limit_chunk,triton_xl_chunk,native_chunkwise")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    B, NH, S, DHQK, DHHV = (int(n) for n in args.shape.split(","))
    dt = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 5)
    q, k = (jax.random.normal(key, (B, NH, S, DHQK), dt) for key in keys[:2])
    v = jax.random.normal(keys[2], (B, NH, S, DHHV), dt)
    i, f = jax.random.normal(keys[3], (B, NH, S)), 3.0 + jax.random.normal(keys[4], (B, NH, S))
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 1), ("data", "sp"), devices=jax.devices()[:1], axis_types=auto)
    rows = []
    for backend in args.backends.split(","):
        run = functools.partial(xlstm_jax.mlstm, backend=backend)
        seq = P(None, None, "sp")
        in_sequence = jax.shard_map(lambda *a: run(*a, sequence_axis_name="sp"), mesh=mesh, in_specs=(seq,) * 5,
                                    out_specs=seq)
        batch = NamedSharding(mesh, P("data"))
        split = tuple(jax.device_put(a, NamedSharding(mesh, seq)) for a in (q, k, v, i, f))
        paths = {
            "plain": (run, (q, k, v, i, f)),
            "batch-sharded": (run, tuple(jax.device_put(a, batch) for a in (q, k, v, i, f))),
            "sequence axis": (in_sequence, split),
        }
        for path, (fn, inputs) in paths.items():
            for mode in ("fw", "fwbw"):
                call = fn if mode == "fw" else jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32)),
                                                       argnums=(0, 1, 2, 3, 4))
                stats = time_jax(call, lambda inputs=inputs: inputs, args.reps)
                rows.append({"backend": backend, "path": path, "mode": mode, "ms": stats["ms_median"],
                             "iqr": stats["ms_iqr"]})
                print(f"{backend:20s} {path:14s} {mode:5s} {rows[-1]['ms']:8.3f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": args.shape, "dtype": args.dtype, "jax": jax.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
