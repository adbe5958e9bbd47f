"""Context-parallel mLSTM scaling (issue 22, item 2): one sequence of S tokens (B=1, NH=16, DHQK=128, DHHV=256,
bf16) split over n devices along a "seq" mesh axis (`xlstm_jax.mlstm(..., sequence_axis_name="seq")` inside
`jax.shard_map`), fw and fw+bw, each combine of the shards' states.

Per row: the median time (`xlstm_jax.bench.measure.time_jax`), the strong-scaling efficiency against the plain
one-device call of the same S (T_1 / (n · T_n)), and, on GPUs, the share of the busiest device's kernel time spent
in collectives (all-gather, collective-permute, all-reduce kernels of one profiled call). A row that does not fit
or fails is recorded with its error and the sweep goes on.

    python scripts/context_parallel_scaling.py --tokens 65536 262144 1048576 --devices 1 2 4 8 --json cp.json
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/context_parallel_scaling.py --tiny
"""

from __future__ import annotations

import argparse
import collections
import functools
import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import xlstm_jax
from xlstm_jax.bench.measure import mlstm_inputs, time_jax, with_mode
from xlstm_jax.bench.trace import traced_events

COLLECTIVES = ("all-gather", "all_gather", "allgather", "collective-permute", "collective_permute", "sendrecv",
               "all-reduce", "all_reduce", "allreduce", "nccl")
SEQ = P(None, None, "seq")


def comm_share(fn, args) -> float | None:
    """The largest fraction, over the GPUs, of a device's kernel time spent in collectives during one call of
    jit(fn); None off GPUs (a CPU trace has no device streams to attribute)."""
    if jax.default_backend() != "gpu":
        return None
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    busy, comm = collections.defaultdict(float), collections.defaultdict(float)
    for event in traced_events(lambda: compiled(*args)):
        busy[event["pid"]] += event["dur"]
        if any(name in event["name"].lower() for name in COLLECTIVES):
            comm[event["pid"]] += event["dur"]
    return max((comm[pid] / busy[pid] for pid in busy if busy[pid] > 0), default=None)


def split_call(devices: int, combine: str, backend: str):
    """(fn, place): the context-parallel call on the first `devices` devices and the placement of its inputs."""
    mesh = jax.make_mesh((devices,), ("seq",), devices=jax.devices()[:devices])
    run = functools.partial(xlstm_jax.mlstm, backend=backend, sequence_axis_name="seq", sequence_combine=combine)
    fn = jax.shard_map(run, mesh=mesh, in_specs=(SEQ,) * 5, out_specs=SEQ)
    return fn, lambda arrays: tuple(jax.device_put(a, NamedSharding(mesh, SEQ)) for a in arrays)


def measure(S: int, devices: int, combine: str | None, mode: str, backend: str, dims, dtype, reps: int) -> dict:
    """One row: combine None is the plain one-device call (the baseline)."""
    NH, DHQK, DHHV = dims
    row = {"S": S, "devices": devices, "combine": combine or "none (plain call)", "mode": mode, "backend": backend}
    try:
        arrays = mlstm_inputs(1, NH, S, DHQK, DHHV, dtype)
        if combine is None:
            fn, args = functools.partial(xlstm_jax.mlstm, backend=backend), arrays
        else:
            fn, place = split_call(devices, combine, backend)
            args = place(arrays)
        call = with_mode(fn, mode, 5)
        row["ms"] = time_jax(call, lambda: args, reps)["ms_median"]
        row["comm_share"] = comm_share(call, args) if devices > 1 else 0.0
    except Exception as err:  # out of memory at the longest S on few devices is a result, not the end of the sweep
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return row


def _report(row: dict) -> dict:
    what = f"{row['ms']:9.3f} ms" if "ms" in row else f"failed: {row['error']}"
    extra = "".join(f"  {key} {row[key]:.2f}" for key in ("efficiency", "comm_share") if row.get(key) is not None)
    print(f"S={row['S']:<8d} {row['mode']:5s} {row['devices']} dev {row['combine']:18s} {what}{extra}", flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[65536, 262144, 1048576])
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--combines", nargs="+", default=["all_gather", "ppermute"])
    parser.add_argument("--modes", nargs="+", default=["fw", "fwbw"], choices=["fw", "fwbw"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="S 256, NH 2, 16/16, float32 (a check, e.g. on a CPU)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    dims, dtype, tokens = (16, 128, 256), jnp.bfloat16, args.tokens
    if args.tiny:
        dims, dtype, tokens = (2, 16, 16), jnp.float32, [256]
    counts = [n for n in args.devices if n <= len(jax.devices())]
    skipped = sorted(set(args.devices) - set(counts))
    if skipped:
        print(f"skipping device counts {skipped}: only {len(jax.devices())} devices", flush=True)
    rows = []
    for S in tokens:
        for mode in args.modes:
            base = measure(S, 1, None, mode, args.backend, dims, dtype, args.reps)
            rows.append(_report(base))
            for n in counts:
                for combine in args.combines:
                    if S % n == 0:
                        row = measure(S, n, combine, mode, args.backend, dims, dtype, args.reps)
                        if "ms" in row and "ms" in base:
                            row["efficiency"] = base["ms"] / (n * row["ms"])
                        rows.append(_report(row))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "dims": dims,
                       "dtype": jnp.dtype(dtype).name, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
