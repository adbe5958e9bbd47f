"""Where the time of one xLSTM-7B decode step goes: GPU kernel time by kind, from a JAX profiler trace.

One token at batch 1 (bf16 weights, random), `model(token, states)` jitted with the "mlstm_step" step backend, for
each weight mode ("single": q, k, v, o, i, f and the FFN's gate and up projections as separate matrices; "fused":
concatenated). Traces `--calls` calls (after warm-up) with `jax.profiler.trace(create_perfetto_trace=True)` and sums
the device events of the Perfetto trace by kernel kind: GEMV/GEMM (cuBLAS, XLA's Triton GEMMs), the mLSTM step
kernel, and XLA fusions (norms, gates, activations, residual adds, converts). Prints ms per token.

    python scripts/profile_decode.py --out /tmp/profile --json profile.json      # --tiny on a CPU
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from xlstm_jax.bench.trace import traced_events
from xlstm_jax.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.model import zero_states

KINDS = (("mlstm step kernel", ("_step_kernel",)), ("matmul", ("gemv", "gemm", "cublas", "cutlass", "triton_gemm",
         "dot", "sm90_xmma", "nvjet")), ("fusion", ("fusion", "loop_", "input_", "convert", "copy", "transpose")))


def kind_of(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, needles in KINDS if any(n in lower for n in needles)), "other")


def profile(config: xLSTMLargeConfig, calls: int, out: str) -> dict:
    graphdef, params = nnx.split(xLSTMLarge(config, rngs=nnx.Rngs(0)))
    step = jax.jit(lambda p, tok, st: nnx.merge(graphdef, p)(tok[:, None], states=st, return_states=True,
                                                             backend="mlstm_step"))
    token, states = jnp.zeros((1,), jnp.int32), zero_states(config, 1)
    for _ in range(3):
        jax.block_until_ready(step(params, token, states))

    def run():
        for _ in range(calls):
            logits, _ = step(params, token, states)
        return logits

    start = time.perf_counter()
    jax.block_until_ready(run())
    wall_ms = 1e3 * (time.perf_counter() - start) / calls
    events = traced_events(run, os.path.join(out, config.weight_mode))
    by_kind, count = collections.defaultdict(float), collections.Counter()
    top = collections.defaultdict(float)
    for event in events:
        kind = kind_of(event["name"])
        by_kind[kind] += event["dur"] / 1e3 / calls
        count[kind] += 1
        top[event["name"][:60]] += event["dur"] / 1e3 / calls
    return {"weight_mode": config.weight_mode, "wall_ms_per_token": wall_ms,
            "kernel_ms_per_token": dict(by_kind), "kernels_per_token": {k: v / calls for k, v in count.items()},
            "top": sorted(top.items(), key=lambda kv: -kv[1])[:15]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", default="/tmp/xlstm_jax_profile")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    size = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=256) if args.tiny else {}
    rows = []
    for mode in ("single", "fused"):
        config = xLSTMLargeConfig(**size, param_dtype="bfloat16", compute_dtype="bfloat16", weight_mode=mode)
        row = profile(config, args.calls, args.out)
        rows.append(row)
        busy = sum(row["kernel_ms_per_token"].values())
        print(f"{mode:6s} wall {row['wall_ms_per_token']:.3f} ms/token, kernels busy {busy:.3f} ms: "
              + ", ".join(f"{k} {v:.3f} ms ({row['kernels_per_token'][k]:.0f})"
                          for k, v in sorted(row["kernel_ms_per_token"].items())), flush=True)
        for name, ms in row["top"]:
            print(f"    {ms:7.3f} ms  {name}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
