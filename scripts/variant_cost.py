"""What the mLSTM variants cost: `mlstm` forward and forward+backward of the Triton families plain, with packed
documents (`segment_ids`, 8 documents per row) and with the sigmoid input gate (`input_gate="sigmoid"`, mLSTMsig), at
B=8, S=8192, NH=16, DHQK=128, DHHV=256, bf16; medians after warm-up, alternating rounds, one process.

    python scripts/variant_cost.py --json variants.json      # --tiny: small shapes, e.g. on a CPU
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from xlstm_jax import mlstm
from xlstm_jax.bench.measure import mlstm_inputs, time_jax

VARIANTS = ("plain", "segment_ids", "sigmoid")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--backends", nargs="+", default=["triton_limit_chunk", "triton_xl_chunk"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    B, NH, S, DHQK, DHHV = (2, 2, 128, 16, 16) if args.tiny else (8, 16, 8192, 128, 256)
    q, k, v, i, f = mlstm_inputs(B, NH, S, DHQK, DHHV, jnp.bfloat16)
    options = {"plain": {}, "sigmoid": {"input_gate": "sigmoid"},
               "segment_ids": {"segment_ids": jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32) // (S // 8), (B, S))}}
    rows = []
    for _ in range(args.rounds):
        for backend in args.backends:
            for variant in args.variants:
                def fw(q, k, v, i, f, backend=backend, kw=options[variant]):
                    return mlstm(q, k, v, i, f, backend=backend, **kw)

                def loss(*a, fw=fw):
                    return jnp.sum(fw(*a).astype(jnp.float32))

                row = {"backend": backend, "variant": variant}
                for mode, fn in (("fw", fw), ("fwbw", jax.grad(loss, argnums=(0, 1, 2, 3, 4)))):
                    row[f"{mode}_ms"] = time_jax(fn, lambda: (q, k, v, i, f), args.reps)["ms_median"]
                rows.append(row)
                print(f"{backend:20s} {variant:12s} fw {row['fw_ms']:.3f} ms, fw+bw {row['fwbw_ms']:.3f} ms",
                      flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "shape": [B, NH, S, DHQK, DHHV], "rows": rows}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
