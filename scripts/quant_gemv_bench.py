"""The xLSTM-7B's decode projections as single matmuls on one GPU: bf16 weights in XLA against int8 / fp8 weights
through the dequantizing Triton kernel and through XLA (dequantize, then the bf16 matmul), at M = 1 and 16 rows;
also the bf16 weights through that kernel (column scales of 1: does a streaming Triton GEMV beat XLA's?).

Each timed call runs the projection over COPIES distinct weight copies in one jitted function (more bytes than
the L2 cache holds, as a decode step streams 32 blocks), so a row's figure is per matmul: microseconds and the
weight bytes it streams per second. --sweep also times the kernel's launch parameters (block_n, block_k,
split_k, warps, stages) on the fused q|k|v|o and the FFN down projection.

    python scripts/quant_gemv_bench.py --json gemv.json [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp

from xlstm_jax.bench.measure import time_jax
from xlstm_jax.kernels.quantized_matmul import quantize_weight, quantized_matmul
from xlstm_jax.kernels.quantized_matmul.triton_gemv import matmul_triton
from xlstm_jax.models.xlstm_large import xLSTMLargeConfig

COPIES = 8


def shapes(config: xLSTMLargeConfig) -> dict[str, tuple[int, int]]:
    """(K, N) of each decode matmul of the fused layout."""
    D = config.embedding_dim
    return {"qkv_opreact": (D, 2 * config.qk_dim + 2 * config.v_dim), "out_proj": (config.v_dim, D),
            "proj_up_gate_z": (D, 2 * config.ffn_dim), "proj_down": (config.ffn_dim, D),
            "lm_head": (D, config.vocab_size)}


def chain(matmul):
    """x, weights (a tuple of COPIES operands) -> the sum of matmul(x, weight) over the copies."""
    def run(x, weights):
        return sum(matmul(x, *w) for w in weights)
    return run


def row(what, M, K, N, weight_bytes, fn, args, reps) -> dict:
    t = time_jax(fn, lambda: args, reps)
    us = 1e3 * t["ms_median"] / COPIES
    out = {"what": what, "M": M, "K": K, "N": N, "us": us, "GB_per_s": weight_bytes / (us * 1e3)}
    print(f"{what:50s} M={M:<3d} K={K:<6d} N={N:<6d} {us:8.1f} us {out['GB_per_s']:7.0f} GB/s", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    key = jax.random.key(0)
    for name, (K, N) in shapes(xLSTMLargeConfig()).items():
        w = [0.02 * jax.random.normal(jax.random.fold_in(key, c), (K, N), jnp.bfloat16) for c in range(COPIES)]
        quantized = {s: tuple(quantize_weight(x, s) for x in w) for s in ("int8", "fp8")}
        for M in (1, 16):
            x = jax.random.normal(jax.random.fold_in(key, M), (M, K), jnp.bfloat16)
            rows.append(row(f"{name} bf16 xla", M, K, N, 2 * K * N,
                            chain(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)),
                            (x, tuple((v,) for v in w)), args.reps))
            ones = jnp.ones((N,), jnp.float32)  # bf16 weights through the same streaming kernel (issue 34, item 3)
            rows.append(row(f"{name} bf16 triton", M, K, N, 2 * K * N,
                            chain(lambda x, w, s: matmul_triton(x, w, s, jnp.float32)),
                            (x, tuple((v, ones) for v in w)), args.reps))
            for scheme, weights in quantized.items():
                for backend in ("triton", "xla"):
                    fn = chain(lambda x, wq, s, b=backend: quantized_matmul(x, wq, s, backend=b,
                                                                           out_dtype=jnp.float32))
                    rows.append(row(f"{name} {scheme} {backend}", M, K, N, K * N, fn, (x, weights), args.reps))
                if args.sweep and name in ("qkv_opreact", "proj_down") and scheme == "int8":
                    for bn, bk, split, warps, stages in itertools.product((64, 128, 256), (32, 64, 128),
                                                                          (None,), (4, 8), (3,)):
                        options = {"block_n": bn, "block_k": bk, "split_k": split, "num_warps": warps,
                                   "num_stages": stages}
                        fn = chain(lambda x, wq, s, o=options: quantized_matmul(x, wq, s, backend="triton",
                                                                               out_dtype=jnp.float32, **o))
                        label = f"{name} int8 BN{bn} BK{bk} split{split} w{warps} s{stages}"
                        rows.append({**row(label, M, K, N, K * N, fn, (x, weights), args.reps), **options})
        del w, quantized
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
