"""What packed documents cost: `mlstm` forward+backward with and without `segment_ids` (8 documents per row), the
Triton families at B=8, S=8192, NH=16, DHQK=128, DHHV=256, bf16; medians after warm-up, alternating, one run.

    python scripts/segments_cost.py --json segments.json      # --tiny: small shapes, e.g. on a CPU
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from xlstm_jax import mlstm
from xlstm_jax.bench.measure import time_jax


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--backends", nargs="+", default=["triton_limit_chunk", "triton_xl_chunk"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    B, NH, S, DHQK, DHHV = (2, 2, 128, 16, 16) if args.tiny else (8, 16, 8192, 128, 256)
    keys = jax.random.split(jax.random.key(0), 5)
    q, k = (jax.random.normal(x, (B, NH, S, DHQK), jnp.bfloat16) for x in keys[:2])
    v = jax.random.normal(keys[2], (B, NH, S, DHHV), jnp.bfloat16)
    i, f = jax.random.normal(keys[3], (B, NH, S)), jax.random.normal(keys[4], (B, NH, S)) + 3.0
    segment_ids = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32) // (S // 8), (B, S))
    rows = []
    for _ in range(args.rounds):
        for backend in args.backends:
            for seg in (None, segment_ids):
                def loss(q, k, v, i, f, backend=backend, seg=seg):
                    return jnp.sum(mlstm(q, k, v, i, f, backend=backend, segment_ids=seg).astype(jnp.float32))

                t = time_jax(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), lambda: (q, k, v, i, f), args.reps)
                rows.append({"backend": backend, "segment_ids": seg is not None, "fwbw_ms": t["ms_median"]})
                print(f"{backend:20s} segment_ids {seg is not None!s:5s} fw+bw {t['ms_median']:.3f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "shape": [B, NH, S, DHQK, DHHV], "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
