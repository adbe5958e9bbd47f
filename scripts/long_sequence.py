"""One long sequence against the same tokens in a batch (issue 21): the Triton families' forward and forward +
backward at B=8, S=8192 and at B=1, S=65536 (NH=16, DHQK=128, DHHV=256, bf16), with the state recurrences' sequence
groups swept through the launch parameter recurrent.programs (1: one walk per sequence); medians after warm-up, all
in one process and one run.

    python scripts/long_sequence.py --json long.json         # --tiny: small shapes, e.g. on a CPU
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from xlstm_jax.bench.measure import mlstm_inputs, time_jax
from xlstm_jax.kernels.triton import core as triton_core, families as triton_families


def _calls(cfg: triton_core.KernelConfig):
    """fw and fw+bw (gradient of sum(h) for q, k, v, i, f) of the Triton core with `cfg`, zero initial states."""

    def fw(q, k, v, i, f):
        B, NH, _, DHQK = q.shape
        zeros = (jnp.zeros((B, NH, DHQK, v.shape[-1])), jnp.zeros((B, NH, DHQK)), jnp.zeros((B, NH)))
        return triton_core.mlstm_triton_core(q, k, v, i, f, *zeros, cfg)[0]

    def loss(*args):
        return jnp.sum(fw(*args).astype(jnp.float32))

    return {"fw": fw, "fwbw": jax.grad(loss, argnums=(0, 1, 2, 3, 4))}


def groups_of(cfg: triton_core.KernelConfig, B: int, NH: int, S: int, DHQK: int, DHHV: int) -> int:
    """The sequence groups the state recurrences of a (B, NH, S) call run in."""
    return triton_core.recurrent_launch(B * NH, -(-S // cfg.recurrent_chunk), DHQK, DHHV, cfg)["GROUPS"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--runs", nargs="+", default=["limit:64", "xl:128"], help="family:chunk")
    parser.add_argument("--programs", default="0,1,512,2048,4096",
                        help="recurrent.programs values for the long sequence (0: the launch table's)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    NH, DHQK, DHHV = (2, 16, 16) if args.tiny else (16, 128, 256)
    batched, single = ((4, 64), (1, 256)) if args.tiny else ((8, 8192), (1, 65536))
    rows = []
    for run in args.runs:
        family, chunk = run.split(":")
        base = triton_families.config(family, int(chunk), jnp.bfloat16)
        points = [(batched, 0)] + [(single, int(p)) for p in args.programs.split(",")]
        for (B, S), programs in points:
            cfg = base.with_launch({"recurrent.programs": programs}) if programs else base
            inputs = mlstm_inputs(B, NH, S, DHQK, DHHV, jnp.bfloat16)
            row = {"run": run, "B": B, "S": S, "recurrent_programs": programs or "table",
                   "groups": groups_of(cfg, B, NH, S, DHQK, DHHV)}
            for name, fn in _calls(cfg).items():
                row[f"{name}_ms"] = time_jax(fn, lambda inputs=inputs: inputs, args.reps)["ms_median"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    for run in args.runs:
        ref = next(r for r in rows if r["run"] == run and r["B"] == batched[0])
        for r in rows:
            if r["run"] == run and r is not ref:
                print(f"{run} B=1 programs={r['recurrent_programs']} groups={r['groups']}: fw {r['fw_ms']:.3f} ms "
                      f"({r['fw_ms'] / ref['fw_ms']:.2f}x batched {ref['fw_ms']:.3f}), fw+bw {r['fwbw_ms']:.3f} ms "
                      f"({r['fwbw_ms'] / ref['fwbw_ms']:.2f}x batched {ref['fwbw_ms']:.3f})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "NH": NH, "DHQK": DHQK,
                       "DHHV": DHHV, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
