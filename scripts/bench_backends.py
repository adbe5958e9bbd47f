"""Side-by-side forward and forward+backward medians of mLSTM backends at given shapes (GPU numbers count).

    python scripts/bench_backends.py --backends triton_limit_chunk native_chunkwise \
        --shape 8,16,8192,128,256 --shape 8,8,8192,256,512 --dtype bfloat16 --chunk-size 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import xlstm_jax


def _inputs(B, NH, S, DHQK, DHHV, dtype):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(keys[0], (B, NH, S, DHQK), dtype)
    k = jax.random.normal(keys[1], (B, NH, S, DHQK), dtype)
    v = jax.random.normal(keys[2], (B, NH, S, DHHV), dtype)
    i = jax.random.normal(keys[3], (B, NH, S), jnp.float32)
    f = 3.0 + jax.random.normal(keys[4], (B, NH, S), jnp.float32)
    return q, k, v, i, f


def _median_ms(fn, args, reps):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def bench(backend, shape, dtype, chunk_size, reps):
    args = _inputs(*shape, dtype)
    kw = {} if chunk_size is None or backend in ("native_parallel", "native_recurrent") else {"chunk_size": chunk_size}

    def fw(q, k, v, i, f):
        return xlstm_jax.mlstm(q, k, v, i, f, backend=backend, **kw)

    def loss(q, k, v, i, f):
        return jnp.sum(fw(q, k, v, i, f).astype(jnp.float32))

    fw_j = jax.jit(fw)
    fwbw_j = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return _median_ms(fw_j, args, reps), _median_ms(fwbw_j, args, reps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backends", nargs="+", default=["triton_limit_chunk", "native_chunkwise"])
    p.add_argument("--shape", action="append", help="B,NH,S,DHQK,DHHV", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in (a.shape or ["8,16,8192,128,256"])]
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  dtype {a.dtype}  chunk {a.chunk_size}")
    print(f"{'backend':22s} {'B,NH,S,DHQK,DHHV':24s} {'fw ms (min..max)':24s} {'fw+bw ms (min..max)':24s}")
    for shape in shapes:
        for backend in a.backends:
            try:
                (fm, flo, fhi), (bm, blo, bhi) = bench(backend, shape, jnp.dtype(a.dtype), a.chunk_size, a.reps)
                print(f"{backend:22s} {str(shape):24s} {fm:8.2f} ({flo:.2f}..{fhi:.2f})  {bm:8.2f} ({blo:.2f}..{bhi:.2f})",
                      flush=True)
            except Exception as e:  # a failing backend must not stop the comparison
                print(f"{backend:22s} {str(shape):24s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
