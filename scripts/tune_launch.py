"""Offline tuning of the Triton launch parameters (launch_table.json, and the xl-chunk tiles) on a GPU.

Coordinate descent from the checked-in values: one parameter at a time over its candidates, keeping a change only
when it lowers fw + fw·bw median time. Every candidate's gradients are compared with the checked-in
configuration's (a miscompiled kernel gives wrong numbers, not an error: see the dq_warps note in
launch_table.py); a candidate that deviates is rejected. Prints each step and writes the winners as JSON; with
--write-table also as the device's entry for the shape's bucket in launch_table.json (commit that file):

    python scripts/tune_launch.py --shape 8,16,8192,128,256 --out out/tune.json --write-table
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.bench.measure import mlstm_inputs, timed_runs, timing_stats, with_mode
from xlstm_jax.kernels.triton import launch_table, core as triton_core, families as triton_families

# Candidates per knob ("section.field" of the launch table). The recurrent section is shared by both families
# (SHARED is tuned in the first run only); "tile_q", "tile_kv" and "inter_chunk_size" are arguments of the xl-chunk
# function.
SHARED = {"recurrent.block": (32, 64, 128), "recurrent.warps": (1, 2, 4), "recurrent.stages": (1, 2, 3),
          "recurrent.tma": (0, 1), "recurrent.programs": (1024, 2048, 4096)}
FAMILY = {
    "limit": {"limit.block": (32, 64, 128), "limit.out_v_block": (64, 128, 256), "limit.warps": (4, 8),
              "limit.warps_l128": (4, 8), "limit.stages": (1, 2, 3), "limit.tma": (0, 1),
              "limit.fused_bw": (0, 1), "limit.chunks_per_program": (1, 2, 4, 8)},
    "xl": {"xl.block": (32, 64, 128), "xl.warps": (4, 8), "xl.out_block": (64, 128, 256), "xl.stages": (1, 2, 3),
           "xl.bw_warps": (4, 8), "xl.dq_block": (64, 128, 256), "xl.dk_block": (64, 128, 256),
           "xl.dv_block": (64, 128, 256), "tile_q": (32, 64, 128), "tile_kv": (32, 64, 128),
           "inter_chunk_size": (32, 64, 128)},
}
XL_ARGS = ("tile_q", "tile_kv", "inter_chunk_size")
GRAD_TOL = 2e-2  # relative (norm-wise) deviation from the checked-in configuration's gradients


def _fw(family: str, chunk: int, xl_args: dict, launch: dict):
    """The family's forward at chunk size `chunk` with `launch` over the table's launch parameters, computing in
    the inputs' dtype from zero initial states."""

    def fw(q, k, v, i, f):
        tiles = tuple(xl_args.get(name) for name in XL_ARGS)
        cfg = triton_families.config(family, chunk, q.dtype, tiles).with_launch(launch)
        B, NH, _, DHQK = q.shape
        c0 = jnp.zeros((B, NH, DHQK, v.shape[-1]), jnp.float32)
        n0, m0 = jnp.zeros((B, NH, DHQK), jnp.float32), jnp.zeros((B, NH), jnp.float32)
        return triton_core.mlstm_triton_core(q, k, v, i, f, c0, n0, m0, cfg)[0]

    return fw


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _time(compiled, args, reps) -> float:
    seconds, _ = timed_runs(lambda: compiled(*args), jax.block_until_ready, reps)
    return timing_stats(seconds)["ms_median"]


def evaluate(family, chunk, setting, args, reps, baseline):
    """(fw ms, fwbw ms, max gradient deviation from `baseline`, gradients) of one setting, or None if it does not
    compile or run. The gradients are those of sum(h) with respect to q, k, v, i, f (the timed fw·bw call)."""
    launch = {k: v for k, v in setting.items() if k not in XL_ARGS}
    xl_args = {k: v for k, v in setting.items() if k in XL_ARGS and family == "xl"}
    try:
        fw = _fw(family, chunk, xl_args, launch)
        fw_call = jax.jit(fw).lower(*args).compile()
        bw_call = jax.jit(with_mode(fw, "fwbw", 5)).lower(*args).compile()
        grads = [np.asarray(g, np.float64) for g in bw_call(*args)]
        dev = 0.0 if baseline is None else max(_rel(g, b) for g, b in zip(grads, baseline))
        return _time(fw_call, args, reps), _time(bw_call, args, reps), dev, grads
    except Exception as err:  # a candidate that fails to compile or launch is just not chosen
        print(f"    {setting}: failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})", flush=True)
        return None


def tune(family, chunk, shape, dtype, reps, shared, only=None):
    knobs = {**(SHARED if shared else {}), **FAMILY[family]}
    if only:
        knobs = {k: v for k, v in knobs.items() if k in only}
    params = triton_families.table_launch(family, shape[3], shape[4])
    setting = {k: params[k] for k in knobs if k in params}
    if family == "xl":
        setting.update(zip(XL_ARGS, (min(64, chunk),) * 3))
    args = mlstm_inputs(*shape, dtype)
    t_fw, t_bw, _, baseline = evaluate(family, chunk, setting, args, reps, None)
    best = (t_fw + t_bw, t_fw, t_bw)
    print(f"{family} L={chunk}: checked-in {setting}: fw {t_fw:.3f} ms, fwbw {t_bw:.3f} ms", flush=True)
    for name, values in knobs.items():
        for value in values:
            if value == setting[name] or (name in XL_ARGS and value > chunk):
                continue
            trial = {**setting, name: value}
            result = evaluate(family, chunk, trial, args, reps, baseline)
            if result is None:
                continue
            f_ms, b_ms, dev, _ = result
            verdict = "WRONG" if dev > GRAD_TOL else ("better" if f_ms + b_ms < best[0] else "")
            print(f"    {name}={value}: fw {f_ms:.3f}, fwbw {b_ms:.3f}, grad dev {dev:.1e} {verdict}", flush=True)
            if verdict == "better":
                setting, best = trial, (f_ms + b_ms, f_ms, b_ms)
    print(f"{family} L={chunk}: best {setting}: fw {best[1]:.3f} ms, fwbw {best[2]:.3f} ms", flush=True)
    return {"family": family, "chunk": chunk, "setting": setting, "fw_ms": best[1], "fwbw_ms": best[2],
            "checked_in_fw_ms": t_fw, "checked_in_fwbw_ms": t_bw}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,16,8192,128,256", help="B,NH,S,DHQK,DHHV")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--runs", nargs="+", default=["limit:64", "xl:128"], help="family:chunk pairs")
    parser.add_argument("--knobs", nargs="+", help="tune only these knobs (default: all)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default="out/tune.json")
    parser.add_argument("--write-table", action="store_true",
                        help="store the winners as this device's entry for the shape's bucket in launch_table.json")
    parser.add_argument("--table", default=str(launch_table.TABLE_PATH), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    start = time.time()
    results = []
    for index, run in enumerate(args.runs):  # the knobs shared by both families are tuned in the first run
        family, chunk = run.split(":")
        results.append(tune(family, int(chunk), shape, jnp.dtype(args.dtype), args.reps,
                            shared=index == 0, only=args.knobs))
    meta = {"device": jax.devices()[0].device_kind, "shape": shape, "dtype": args.dtype, "seconds": time.time() - start}
    if args.write_table:
        sections = {}
        for family in triton_families.families():
            sections.update(triton_core.launch_params(shape[3], shape[4], triton_families.config(family, 64, "float32")))
        for result in results:
            for name, value in result["setting"].items():
                if name not in XL_ARGS:
                    group, field = name.split(".")
                    sections[group] = sections[group].replaced({field: value}, group)
        runs = ", ".join(f"{r['family']} L={r['chunk']} {r['fw_ms']:.2f} / {r['fwbw_ms']:.2f} ms" for r in results)
        source = (f"{meta['device']}, shape {args.shape}, {args.dtype}, {time.strftime('%Y-%m-%d')}: "
                  f"scripts/tune_launch.py (fw / fw+bw: {runs})")
        key = launch_table.write_entry(launch_table.device_arch(), shape[3], shape[4], sections, source, args.table)
        print(f"wrote {key} to {args.table}")
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
