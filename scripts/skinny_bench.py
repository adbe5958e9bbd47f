"""Decoding's projections at the xLSTM-7B shapes: XLA's `x @ w` against the split-K Triton skinny matmul
(xlstm_jax/kernels/skinny_matmul), bf16, M = 1 and 16 rows; a sweep of the kernel's launch parameters at M = 1, the
best one also at M = 16. Medians after warm-up, one process; GB/s counts reading w once.

    python scripts/skinny_bench.py --json skinny.json        # --tiny: small shapes, e.g. on a CPU
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.bench.measure import time_jax
from xlstm_jax.kernels.skinny_matmul.reference import skinny_matmul_reference
from xlstm_jax.kernels.skinny_matmul.triton_skinny import SkinnyLaunch, skinny_matmul_triton

# (name, K, N) of xLSTM-7B's decode matmuls (weight_mode "fused")
SHAPES = [("mlstm qkvo", 4096, 12288), ("mlstm out", 4096, 4096), ("ffn up|gate", 4096, 21888),
          ("ffn down", 10944, 4096)]
TINY = [("tiny a", 96, 80), ("tiny b", 200, 64)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else SHAPES
    grid = ([SkinnyLaunch(16, 16, s, 1, 1) for s in (1, 2)] if args.tiny else
            [SkinnyLaunch(bn, bk, s, w, st) for bn, bk, s, w, st in
             itertools.product((64, 128), (128,), (4, 8, 16), (4,), (3, 4))])
    rows = []
    for (name, K, N), M in itertools.product(shapes, (1, 16)):
        keys = jax.random.split(jax.random.key(K + N + M), 2)
        x = jax.random.normal(keys[0], (M, K), jnp.bfloat16)
        w = jax.random.normal(keys[1], (K, N), jnp.bfloat16)
        want = np.asarray(skinny_matmul_reference(x, w))
        gb = K * N * 2 / 1e9

        def add(impl, fn, p=None):
            t = time_jax(fn, lambda: (x, w), args.reps)["ms_median"]
            err = float(np.max(np.abs(np.asarray(jax.jit(fn)(x, w)) - want)) / np.max(np.abs(want)))
            row = {"shape": name, "K": K, "N": N, "M": M, "impl": impl, "ms": t, "GB_per_s": gb / t * 1e3,
                   "max_rel_err": err, "launch": None if p is None else p.__dict__}
            rows.append(row)
            print(f"{name:12s} M={M:2d} {impl:7s} {t * 1e3:8.1f} us {row['GB_per_s']:7.0f} GB/s err {err:.1e}"
                  f" {'' if p is None else p}", flush=True)
            if args.json:  # after every row: a cut run keeps what it measured
                with open(args.json, "w") as fh:
                    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, fh,
                              indent=1)

        add("xla", skinny_matmul_reference)
        points = grid if M == 1 else [_best(rows, name)]
        for p in points:
            add("triton", lambda x, w, p=p: skinny_matmul_triton(x, w, p), p)


def _best(rows, name) -> SkinnyLaunch:
    ok = [r for r in rows if r["shape"] == name and r["impl"] == "triton" and r["max_rel_err"] < 1e-3]
    return SkinnyLaunch(**min(ok, key=lambda r: r["ms"])["launch"]) if ok else SkinnyLaunch()


if __name__ == "__main__":
    main()
