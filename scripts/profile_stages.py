"""Time each stage of a Triton chunkwise fw / bw on its own (GPU), to see where the milliseconds go, and sweep
launch parameters over single stages (a compile of one stage is seconds, of a whole fw·bw a minute):

    python scripts/profile_stages.py --shape 8,16,8192,128,256 --runs limit:64 xl:128 --out out/stages.json
    python scripts/profile_stages.py --runs limit:64 --sweep recurrent.block=32,64 recurrent.stages=1,2,3 \
        --stages fw.states bw.state_cotangents

Stages (medians, ms): fw.states (state recurrence), fw.total (states + per-chunk outputs), bw.denominator (the
denominator cotangent in XLA), bw.state_cotangents (reverse state recurrence), bw.parallel (dq, dk, dv kernels),
bw.total (the whole custom_vjp backward including recomputed states and gate gradients) and fwbw (gradient of
sum(h) through the public function). Inputs are computed in their own dtype (bf16 by default). A sweep point whose
stage outputs deviate from the checked-in configuration's by more than SWEEP_TOL is marked WRONG (a miscompile).
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.bench.measure import mlstm_inputs, timed_runs, timing_stats
from xlstm_jax.kernels.triton import core as triton_core, families as triton_families
from xlstm_jax.kernels.native.chunk_math import denominator_cotangent

SWEEP_TOL = 2e-2
STAGES = ("fw.states", "fw.total", "bw.denominator", "bw.state_cotangents", "bw.parallel", "bw.total", "fwbw")


def config(family: str, chunk: int, dtype, tiles: tuple[int | None, ...] = (None, None, None),
           launch: dict[str, int] | None = None) -> triton_core.KernelConfig:
    """The kernel configuration of a run; xl `tiles` = (tile_q, tile_kv, inter_chunk_size), None: default;
    `launch`: launch parameters over the table's."""
    return triton_families.config(family, chunk, dtype, tiles).with_launch(launch)


def stages(family: str, chunk: int, shape, dtype, tiles=(None, None, None), launch=None) -> dict[str, tuple]:
    """name -> (function, arguments) of every stage with `launch` over the table's launch parameters."""
    B, NH, S, DHQK, DHHV = shape
    cfg = config(family, chunk, dtype, tiles, launch)
    q, k, v, i, f = mlstm_inputs(*shape, dtype)
    c0 = jnp.zeros((B, NH, DHQK, DHHV), jnp.float32)
    n0, m0 = jnp.zeros((B, NH, DHQK), jnp.float32), jnp.zeros((B, NH), jnp.float32)
    flat = [triton_core.flat(x) for x in (q, k, v, i, f, c0, n0, m0)]
    qf, kf, vf, i_f, f_f, c0f, n0f, m0f = flat
    out, residuals = jax.jit(lambda *a: triton_core.core_fwd(*a, cfg))(q, k, v, i, f, c0, n0, m0)
    h, den, m_out = (triton_core.flat(x) for x in residuals[8:11])
    dh = jnp.ones_like(h)
    lower = jnp.exp(-m_out)
    norm, dden = jax.jit(lambda *a: denominator_cotangent(*a, cfg.eps))(dh, h, den, lower)
    states = jax.jit(lambda *a: triton_core.chunk_states(*a, cfg))(kf, vf, i_f, f_f, c0f, n0f, m0f)
    c_all, n_all, m_all, m_sub, _ = states
    zeros_c, zeros_n = triton_core.flat(jnp.zeros_like(c0)), triton_core.flat(jnp.zeros_like(n0))
    cot_args = (qf, dh, i_f, f_f, m_out, norm, dden, m_sub, zeros_c, zeros_n)
    dc_all, dn_all, _ = jax.jit(lambda *a: triton_core.state_cotangents(*a, cfg))(*cot_args)
    gates = triton_core.gate_vectors(i_f, f_f, chunk)
    grad_dtypes = (q.dtype, k.dtype, v.dtype)
    cotangents = (jnp.ones_like(out[0]), *(jnp.zeros_like(x) for x in out[1:]))

    def fwbw(*a):
        return jax.grad(lambda *x: jnp.sum(triton_core.mlstm_triton_core(*x, c0, n0, m0, cfg)[0].astype(jnp.float32)),
                        argnums=(0, 1, 2, 3, 4))(*a)

    return {
        "fw.states": (lambda *a: triton_core.chunk_states(*a, cfg), (kf, vf, i_f, f_f, c0f, n0f, m0f)),
        "fw.total": (lambda *a: triton_core.forward(*a, cfg, q.dtype)[:3], tuple(flat)),
        "bw.denominator": (lambda *a: denominator_cotangent(*a, cfg.eps), (dh, h, den, lower)),
        "bw.state_cotangents": (lambda *a: triton_core.state_cotangents(*a, cfg), cot_args),
        "bw.parallel": (lambda *a: triton_core.backward_parallel(*a, cfg, grad_dtypes),
                        (qf, kf, vf, dh, gates, i_f, m_out, norm, dden, c_all, n_all, m_all, dc_all, dn_all)),
        "bw.total": (lambda r, c: triton_core.core_bwd(cfg, r, c), (residuals, cotangents)),
        "fwbw": (fwbw, (q, k, v, i, f)),
    }


def run_stage(fn, args, reps: int):
    """(median ms, outputs as float64 arrays) of one stage, compiled afresh (launch parameters are read at trace
    time)."""
    compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    seconds, _ = timed_runs(lambda: compiled(*args), jax.block_until_ready, reps)
    outs = [np.asarray(x, np.float64) for x in jax.tree.leaves(compiled(*args))]
    return timing_stats(seconds)["ms_median"], outs


def _deviation(outs, base) -> float:
    return max(float(np.linalg.norm(o - b) / max(np.linalg.norm(b), 1e-30)) for o, b in zip(outs, base))


def sweep(make_calls, names: list[str], grid: dict[str, list[int]], reps: int) -> list[dict]:
    """Time `names` at every point of the grid of launch parameters (`make_calls(launch)`: the stages with those
    over the table's); rows sorted by total time. Each point's outputs are compared with the table's."""
    base_calls = make_calls({})
    base = {name: run_stage(*base_calls[name], reps)[1] for name in names}
    rows = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        row = {"launch": point, "ms": {}, "deviation": 0.0}
        try:
            calls = make_calls(point)
            for name in names:
                ms, outs = run_stage(*calls[name], reps)
                row["ms"][name] = ms
                row["deviation"] = max(row["deviation"], _deviation(outs, base[name]))
        except Exception as err:  # a point that fails to compile or launch is reported, not fatal
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        row["wrong"] = row["deviation"] > SWEEP_TOL
        print(point, row.get("error") or " ".join(f"{n} {t:.3f}" for n, t in row["ms"].items()),
              f"dev {row['deviation']:.1e}", "WRONG" if row["wrong"] else "", flush=True)
        rows.append(row)
    good = [r for r in rows if "error" not in r and not r["wrong"]]
    return sorted(good, key=lambda r: sum(r["ms"].values())) + [r for r in rows if r not in good]


def _grid(items: list[str], known: dict[str, int]) -> dict[str, list[int]]:
    grid = {}
    for item in items:
        name, values = item.split("=")
        if name not in known:
            raise SystemExit(f"unknown launch parameter {name!r}; known: {sorted(known)}")
        grid[name] = [int(x) for x in values.split(",")]
    return grid


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,16,8192,128,256", help="B,NH,S,DHQK,DHHV")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", nargs="+", default=["limit:64", "xl:128"],
                        help="family:chunk, for xl optionally :tile_q:tile_kv[:inter_chunk_size]")
    parser.add_argument("--stages", nargs="+", help="only these stages (default: all)")
    parser.add_argument("--sweep", nargs="+",
                        help="a grid of launch parameters, e.g. recurrent.stages=1,2,3 recurrent.block=32,64")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    results = {}
    for run in args.runs:
        family, chunk, *tiles = run.split(":")
        tiles = tuple(int(t) for t in tiles) + (None,) * (3 - len(tiles))
        def make_calls(launch, family=family, chunk=int(chunk), tiles=tiles):
            return stages(family, chunk, shape, jnp.dtype(args.dtype), tiles, launch)

        names = args.stages or list(STAGES)
        if args.sweep:
            results[run] = sweep(make_calls, names, _grid(args.sweep, triton_families.table_launch(family, shape[3], shape[4])), args.reps)
            print(run, "best:", results[run][0]["launch"], results[run][0]["ms"], flush=True)
        else:
            calls = make_calls({})
            results[run] = {name: run_stage(*calls[name], args.reps)[0] for name in names}
            print(run, " ".join(f"{name} {ms:.3f}" for name, ms in results[run].items()), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "shape": shape, "dtype": args.dtype,
                       "launch": {family: triton_families.table_launch(family, *shape[3:])
                                  for family in {run.split(":")[0] for run in args.runs}}, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
