"""Time each stage of a Triton chunkwise fw / bw on its own (GPU), to see where the milliseconds go:

    python scripts/profile_stages.py --shape 8,16,8192,128,256 --runs limit:64 xl:128 --out out/stages.json

Stages (medians, ms): fw.states (state recurrence), fw.total (states + per-chunk outputs), bw.denominator (the
denominator cotangent in XLA), bw.state_cotangents (reverse state recurrence), bw.parallel (dq, dk, dv kernels),
bw.total (the whole custom_vjp backward including recomputed states and gate gradients) and fwbw (gradient of
sum(h) through the public function). Inputs computed in their own dtype (bf16 by default).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from xlstm_jax.bench.measure import mlstm_inputs, timed_runs, timing_stats
from xlstm_jax.kernels.mlstm_chunkwise import triton_core as core
from xlstm_jax.kernels.mlstm_chunkwise.common import denominator_cotangent
from xlstm_jax.kernels.mlstm_chunkwise.max_triton_fwbw_v5xlchunksize.triton_fwbw import xl_params


def _ms(fn, *args, reps: int) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    seconds, _ = timed_runs(lambda: compiled(*args), jax.block_until_ready, reps)
    return timing_stats(seconds)["ms_median"]


def config(family: str, chunk: int, dtype) -> core.KernelConfig:
    extra = {}
    if family == "xl":
        Lr, LQ, LKV = xl_params(chunk, None, None, None)
        extra = dict(family="xl", inter_chunk_size=Lr, tile_q=LQ, tile_kv=LKV)
    return core.KernelConfig(chunk_size=chunk, eps=1e-6, compute_dtype=jnp.dtype(dtype).name, **extra)


def profile(family: str, chunk: int, shape, dtype, reps: int) -> dict[str, float]:
    B, NH, S, DHQK, DHHV = shape
    cfg = config(family, chunk, dtype)
    q, k, v, i, f = mlstm_inputs(*shape, dtype)
    c0 = jnp.zeros((B, NH, DHQK, DHHV), jnp.float32)
    n0, m0 = jnp.zeros((B, NH, DHQK), jnp.float32), jnp.zeros((B, NH), jnp.float32)
    flat = [core._flat(x) for x in (q, k, v, i, f, c0, n0, m0)]
    qf, kf, vf, i_f, f_f, c0f, n0f, m0f = flat
    times = {
        "fw.states": _ms(lambda *a: core._chunk_states(*a, cfg), kf, vf, i_f, f_f, c0f, n0f, m0f, reps=reps),
        "fw.total": _ms(lambda *a: core._forward(*a, cfg, q.dtype)[:3], *flat, reps=reps),
    }
    out, residuals = jax.jit(lambda *a: core._core_fwd(*a, cfg))(q, k, v, i, f, c0, n0, m0)
    h, den, m_out = residuals[8:11]
    dh = jnp.ones_like(h)
    lower = jnp.exp(-m_out)
    times["bw.denominator"] = _ms(lambda *a: denominator_cotangent(*a, cfg.eps), dh, h, den, lower, reps=reps)
    norm, dden = jax.jit(lambda *a: denominator_cotangent(*a, cfg.eps))(dh, h, den, lower)
    c_all, n_all, m_all, m_sub, _ = jax.jit(lambda *a: core._chunk_states(*a, cfg))(kf, vf, i_f, f_f, c0f, n0f, m0f)
    zeros_c, zeros_n = core._flat(jnp.zeros_like(c0)), core._flat(jnp.zeros_like(n0))
    times["bw.state_cotangents"] = _ms(lambda *a: core._state_cotangents(*a, cfg), qf, dh, i_f, f_f, m_out, norm,
                                       dden, m_sub, zeros_c, zeros_n, reps=reps)
    dc_all, dn_all, _ = jax.jit(lambda *a: core._state_cotangents(*a, cfg))(qf, dh, i_f, f_f, m_out, norm, dden,
                                                                         m_sub, zeros_c, zeros_n)
    vec_b, vec_a, _ = core._gates(i_f, f_f, chunk)
    grad_dtypes = (q.dtype, k.dtype, v.dtype)
    times["bw.parallel"] = _ms(lambda *a: core._backward_parallel(*a, cfg, grad_dtypes), qf, kf, vf, dh, vec_b,
                               vec_a, i_f, m_out, norm, dden, c_all, n_all, m_all, dc_all, dn_all, reps=reps)
    cotangents = (jnp.ones_like(out[0]), *(jnp.zeros_like(x) for x in out[1:]))
    times["bw.total"] = _ms(lambda r, c: core._core_bwd(cfg, r, c), residuals, cotangents, reps=reps)

    def loss(*a):
        return jnp.sum(core.mlstm_triton_core(*a, c0, n0, m0, cfg)[0].astype(jnp.float32))

    times["fwbw"] = _ms(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), q, k, v, i, f, reps=reps)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,16,8192,128,256", help="B,NH,S,DHQK,DHHV")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", nargs="+", default=["limit:64", "xl:128"], help="family:chunk pairs")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    results = {}
    for run in args.runs:
        family, chunk = run.split(":")
        results[run] = profile(family, int(chunk), shape, jnp.dtype(args.dtype), args.reps)
        print(run, " ".join(f"{name} {ms:.3f}" for name, ms in results[run].items()), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "shape": shape, "dtype": args.dtype,
                       "launch": core.LAUNCH, "ms": results}, fh, indent=1)


if __name__ == "__main__":
    main()
