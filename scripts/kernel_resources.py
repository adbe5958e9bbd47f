"""Registers, spilled bytes and shared memory of a Triton family's per-chunk kernels (limit-chunk or xl-chunk)
compiled ahead of time for a GPU architecture, on any machine: Triton compiles a cubin with its bundled ptxas and
its bundled cuobjdump reads the resource usage, so no GPU is needed. Register pressure is what caps these kernels
(docs/benchmarks.md, Nsight Compute: 254-255 registers a thread, 12.5% occupancy), so a launch knob's effect on it
can be read before a GPU is lent:

    python scripts/kernel_resources.py --sweep limit.tma=0,1 limit.fused_bw=0,1 --json out/resources.json
    python scripts/kernel_resources.py --family xl --chunk 128 --sweep xl.bw_warps=4,8

Each kernel is compiled with the constants its launch uses (core.block tiles of the launch table entry for --arch
and the head dims, with the sweep point's overrides): limit's forward output kernel (the chunk loop where
limit.chunks_per_program > 1) and its dq and dk/dv kernels or its one backward kernel (limit.fused_bw); xl's
forward output kernel and its dq, dk and dv kernels (64 x 64 query and key tiles). STACK is the per-thread stack
frame (spilled registers and local arrays); the figures come from the installed Triton, which may allocate
registers differently from the GPU machine's.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from xlstm_jax.kernels.base import qk_scale
from xlstm_jax.kernels.triton import launch_table
from xlstm_jax.kernels.triton.core import block
from xlstm_jax.kernels.triton.limit import bw_kernels, fw_kernels
from xlstm_jax.kernels.triton.limit.family import LimitLaunch
from xlstm_jax.kernels.triton.xl import kernels as xl_kernels
from xlstm_jax.kernels.triton.xl.family import XlLaunch

POINTER_DTYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}
ROWS = ("Q", "K", "V", "DH", "H", "DQ", "DK", "DV")  # in the compute dtype; C_ALL / DC_ALL too (float32 for fp16)


def cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resources(kernel, consts: dict, dtype: str, arch: int, warps: int, stages: int,
              descriptors: dict[str, tuple[int, int]]) -> dict[str, int]:
    """{REG, STACK (bytes a thread), LOCAL, SHARED (Triton's dynamic shared memory, bytes)} of `kernel` compiled for
    sm_<arch> with constexprs `consts`; the parameters named in `descriptors` are TMA tensor descriptors with those
    tiles (as the launch layer passes them)."""
    params = list(inspect.signature(kernel.fn).parameters)
    state = "*fp32" if dtype == "float16" else POINTER_DTYPES[dtype]
    pointers = {**{name: POINTER_DTYPES[dtype] for name in ROWS}, "C_ALL": state, "DC_ALL": state, "CAREFUL": "*i32"}
    pointers.update({name: f"tensordesc<{POINTER_DTYPES[dtype][1:]}[{rows}, {cols}]>"
                     for name, (rows, cols) in descriptors.items()})
    signature = {name: "constexpr" if name in consts else pointers.get(name, "*fp32") for name in params}
    constexprs = {(params.index(name),): value for name, value in consts.items() if name in params}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(compiled.asm["cubin"])
    try:
        text = subprocess.run([cuobjdump(), "-res-usage", fh.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(fh.name)
    usage = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", text)}
    return {**usage, "SHARED": int(compiled.metadata.shared)}


OUTPUT_CONSTS = dict(EPS=1e-6, NORM_VAL=1.0, STABILIZE_CORRECTLY=True, MAX_STATE=True)


Kernels = list[tuple[str, object, dict, int]]  # (name, kernel, constexprs, warps)


def row_descriptors(consts: dict) -> dict[str, tuple[int, int]]:
    """The TMA descriptors (parameter: tile) of a kernel with these constexprs (none without TMA): q, k in (L, BK)
    tiles, v and dh in (L, BV) tiles (limit.family)."""
    if not consts.get("TMA"):
        return {}
    L, BK, BV = consts["L"], consts["BK"], consts["BV"]
    return {"Q": (L, BK), "K": (L, BK), "V": (L, BV), "DH": (L, BV)}


def limit_kernels(p: LimitLaunch, chunk: int, seq_len: int, DHQK: int, DHHV: int) -> Kernels:
    """The per-chunk kernels a limit-chunk call of these sizes launches."""
    NC = seq_len // chunk
    common = dict(NC=NC, L=chunk, DHQK=DHQK, DHHV=DHHV, BK=block(DHQK, p.block), QK_SCALE=qk_scale(DHQK),
                  TMA=bool(p.tma))
    warps = p.warps if chunk <= 64 else p.warps_l128
    output = dict(common, NS=NC + 1, BV=block(DHHV, p.out_v_block), **OUTPUT_CONSTS)
    if p.chunks_per_program > 1:
        out = [("fw output", fw_kernels.mlstm_fw_chunk_loop_kernel,
                dict(output, CHUNKS=min(p.chunks_per_program, NC), STAGES=p.stages), warps)]
    else:
        out = [("fw output", fw_kernels.mlstm_fw_parallel_kernel, output, warps)]
    gradients = dict(common, BV=block(DHHV, p.block))
    if p.fused_bw:
        return out + [("bw dq+dk+dv", bw_kernels.mlstm_bw_gradients_kernel, dict(gradients, NS=NC + 1), p.dq_warps)]
    return out + [("bw dq", bw_kernels.mlstm_bw_dq_kernel, dict(gradients, NS=NC + 1), p.dq_warps),
                  ("bw dk/dv", bw_kernels.mlstm_bw_dkdv_kernel, gradients, warps)]


def xl_kernels_of(p: XlLaunch, chunk: int, seq_len: int, DHQK: int, DHHV: int) -> Kernels:
    """The same for an xl-chunk call (query and key tiles min(64, chunk), as its default)."""
    NC, tile = seq_len // chunk, min(64, chunk)
    common = dict(NC=NC, L=chunk, DHQK=DHQK, DHHV=DHHV, LQ=tile, LKV=tile, QK_SCALE=qk_scale(DHQK))
    gradients = dict(common, BK=block(DHQK, p.block), BV=block(DHHV, p.block))
    return [("fw output", xl_kernels.mlstm_xl_fw_parallel_kernel,
             dict(common, NS=NC + 1, BK=block(DHQK, p.block), BV=block(DHHV, p.out_block), **OUTPUT_CONSTS), p.warps),
            ("bw dq", xl_kernels.mlstm_xl_bw_dq_kernel, dict(gradients, NS=NC + 1, BK=block(DHQK, p.dq_block)),
             p.bw_warps),
            ("bw dk", xl_kernels.mlstm_xl_bw_dk_kernel, dict(gradients, BO=block(DHQK, p.dk_block)), p.bw_warps),
            ("bw dv", xl_kernels.mlstm_xl_bw_dv_kernel, dict(gradients, BO=block(DHHV, p.dv_block)), p.bw_warps)]


FAMILIES = {"limit": (LimitLaunch, limit_kernels), "xl": (XlLaunch, xl_kernels_of)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="limit", choices=sorted(FAMILIES))
    parser.add_argument("--head-dims", default="128,256", help="DHQK,DHHV")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(POINTER_DTYPES))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    parser.add_argument("--sweep", nargs="*", default=[], help="FAMILY.FIELD=V1,V2 ... over the table's entry")
    parser.add_argument("--json", help="file for the rows")
    args = parser.parse_args(argv)
    DHQK, DHHV = (int(d) for d in args.head_dims.split(","))
    launch_type, family_kernels = FAMILIES[args.family]
    base = launch_table.section(args.family, launch_type, DHQK, DHHV, f"sm{args.arch}")
    grid = {}
    for item in args.sweep:
        name, _, values = item.partition("=")
        section, _, field = name.partition(".")
        if section != args.family or field not in dataclasses.asdict(base) or not values:
            parser.error(f"--sweep takes {args.family}.FIELD=V1,V2 with a field of {sorted(dataclasses.asdict(base))}, "
                         f"got {item!r}")
        grid[field] = [int(v) for v in values.split(",")]
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.family}, DHQK {DHQK}, DHHV {DHHV}, L {args.chunk}, "
          f"{args.dtype}")
    rows = []
    for point in itertools.product(*grid.values()):
        overrides = dict(zip(grid, point))
        p = base.replaced(overrides, args.family)
        for name, kernel, consts, warps in family_kernels(p, args.chunk, args.seq_len, DHQK, DHHV):
            usage = resources(kernel, consts, args.dtype, args.arch, warps, p.stages, row_descriptors(consts))
            rows.append({"point": overrides, "kernel": name, "warps": warps, "stages": p.stages, **usage})
            print(f"{json.dumps(overrides):40s} {name:12s} {warps} warps  registers {usage['REG']:3d}  "
                  f"stack {usage['STACK']:5d} B  shared {usage['SHARED']} B", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"triton": triton.__version__, "arch": args.arch, "family": args.family,
                       "head_dims": [DHQK, DHHV], "chunk": args.chunk, "dtype": args.dtype, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
