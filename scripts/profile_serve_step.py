"""Where the time of the serving engine's device steps goes: the decode step of the slot pool alone, with a prefill
chunk riding along (`mixed_step`), and a prefill chunk alone, each timed and traced.

The steps are `xlstm_jax.serve.steps`' own, on the xLSTM-7B architecture (random bf16 weights, fused layout) with
`--slots` slots, every slot active, and a chunk of L prompt tokens. Each variant is compiled, timed without the
profiler (median of `--reps` runs of back-to-back calls, states carried from call to call as the engine carries
them; and with AHEAD calls dispatched before one wait, as the engine dispatches a step before it reads the one
before), then `--calls` calls are traced and their device events matched to the compiled HLO: device time by kind
(matmul, Triton kernel, fusion, transpose/copy, other) and by place in the model (the named scopes project,
mlstm_cell, output, ffn, head, sample; the rest), the kernels that take most, device busy time and the host gap.

Variants: "decode", "mixed:L[:BACKEND[:CHUNK]]" (the chunk's cell on BACKEND with chunk size CHUNK, default the
config's), "prefill:L[:BACKEND[:CHUNK]]".

    python scripts/profile_serve_step.py --json serve_step.json                     # GPU: the 7B architecture
    python scripts/profile_serve_step.py --tiny --variants decode,mixed:32          # a tiny model on a CPU
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlstm_jax.bench.hlo import MATMUL_KERNELS, busy_us, instruction_of, is_matmul, op_name, parse_hlo
from xlstm_jax.bench.measure import timed_runs, timing_stats
from xlstm_jax.bench.trace import traced_events
from xlstm_jax.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig
from xlstm_jax.serve import steps

AHEAD = 5  # steps dispatched back to back for the engine-like timing
KINDS = ("matmul", "triton", "fusion", "transpose_copy", "other")
PLACES = ("project", "mlstm_cell", "output", "ffn", "head", "sample", "rest")


def kind_and_place(event: dict, hlo: dict[str, dict]) -> tuple[str, str]:
    """(KINDS entry, PLACES entry) of a device event: what ran, and under which of the model's named scopes."""
    kernel = event["name"].lower()
    name = instruction_of(event, hlo)
    info = hlo.get(name, {"opcode": "", "target": ""})
    scope = op_name(hlo, name) if name else ""
    place = next((p for p in PLACES[:-1] if f"/{p}/" in f"/{scope}/"), "rest")
    if any(k in kernel for k in MATMUL_KERNELS) or (name is not None and is_matmul(hlo, name)):
        return "matmul", place
    if "triton" in info["target"].lower() or "mlstm" in kernel or "_kernel" in kernel:
        return "triton", place
    if info["opcode"] in ("transpose", "copy") or any(k in kernel for k in ("transpose", "copy", "memcpy",
                                                                               "memset")):
        return "transpose_copy", place
    if info["opcode"] == "fusion" or "fusion" in kernel:
        return "fusion", place
    return "other", place


class Steps:
    """The engine's device functions on one model, with inputs for `slots` active slots."""

    def __init__(self, model: xLSTMLarge, slots: int, state_dtype: str):
        self.config = model.config
        self.graphdef, params = nnx.split(model)
        self.params_tree, self.params = steps.flat_params(params)
        self.slots, self.state_dtype = slots, state_dtype
        M = slots
        self.pool = steps.empty_states(self.config, M, state_dtype)
        ints = np.zeros((M,), np.int32)
        ones = np.ones((M,), bool)
        self.inputs = tuple(map(jnp.asarray, (ints + 1, ones, ones, np.zeros((M, 2), np.uint32), ints, ints,
                                              np.zeros((M,), np.float32), ints + 1, np.ones((M,), np.float32))))
        self.previous = jnp.zeros((M,), jnp.int32)

    def call(self, variant: str):
        """(compiled function of no arguments running the variant once, carrying its states, its HLO text)."""
        kind, *rest = variant.split(":")
        static = dict(graphdef=self.graphdef, params_tree=self.params_tree, state_dtype=self.state_dtype)
        backend = rest[1] if len(rest) > 1 else self.config.backend
        chunk_size = int(rest[2]) if len(rest) > 2 else self.config.chunk_size
        if kind == "decode":
            fn = steps.compiled(steps.decode_step, backend=self.config.step_backend, **static)
            args = lambda: (self.params, self.pool, self.previous, *self.inputs)  # noqa: E731
        else:
            L = int(rest[0])
            chunk, mask = jnp.ones((1, L), jnp.int32), jnp.ones((1, L), bool)
            state = steps.empty_states(self.config, 1, self.state_dtype)
            if kind == "mixed":
                fn = steps.compiled(steps.mixed_step, step_backend=self.config.step_backend, backend=backend,
                                    chunk_size=chunk_size, **static)
                args = lambda: (self.params, self.pool, self.previous, *self.inputs, state, chunk, mask)  # noqa
            elif kind == "prefill":
                fn = steps.compiled(steps.prefill_chunk, backend=backend, chunk_size=chunk_size, **static)
                args = lambda: (self.params, state, chunk, mask)  # noqa: E731
            else:
                raise ValueError(f"unknown variant {variant!r}: expected decode, mixed:L[:BACKEND[:CHUNK]] or "
                                 "prefill:L[:BACKEND[:CHUNK]].")
        text = fn.lower(*args()).compile().as_text()

        def run():
            out = fn(*args())
            if kind != "prefill":
                self.pool = out[1]  # donated: the next call takes the new pool, as the engine does
            return out

        return run, text


def profile(model: xLSTMLarge, variant: str, slots: int, state_dtype: str, calls: int, reps: int, top: int) -> dict:
    runner = Steps(model, slots, state_dtype)
    start = time.perf_counter()
    run, text = runner.call(variant)
    run()
    compile_s = time.perf_counter() - start
    hlo = parse_hlo(text)
    timing = timing_stats(timed_runs(run, jax.block_until_ready, reps)[0])
    # as the engine runs: the next step is dispatched before the host waits for the one before
    ahead = timed_runs(run, jax.block_until_ready, reps, calls=AHEAD)[0]

    def traced():
        for _ in range(calls):
            out = run()
        return out

    events = traced_events(traced)
    if jax.default_backend() == "cpu":  # every event of the process: keep XLA's thunks
        events = [e for e in events if "hlo_op" in e.get("args", {})]
    table = collections.defaultdict(float)
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for event in events:
        kind, place = kind_and_place(event, hlo)
        ms = float(event["dur"]) / 1e3 / calls
        table[f"{kind}/{place}"] += ms
        kernels[(event["name"][:80], kind, place)][0] += ms
        kernels[(event["name"][:80], kind, place)][1] += 1
    busy = busy_us(events) / 1e3 / calls
    return {
        "variant": variant, "slots": slots, "state_dtype": state_dtype, "step_ms": timing["ms_median"],
        "step_iqr_ms": timing["ms_iqr"], "ahead_step_ms": timing_stats(ahead)["ms_median"],
        "device_busy_ms": busy, "host_gap_ms": timing["ms_median"] - busy,
        "compile_s": compile_s, "kind_place_ms": dict(sorted(table.items(), key=lambda kv: -kv[1])),
        "by_kind_ms": {k: sum(v for key, v in table.items() if key.startswith(k + "/")) for k in KINDS},
        "by_place_ms": {p: sum(v for key, v in table.items() if key.endswith("/" + p)) for p in PLACES},
        "top_kernels": [{"kernel": k, "kind": kind, "place": place, "ms": v[0], "calls": v[1] / calls}
                        for (k, kind, place), v in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]],
        "events_per_call": len(events) / calls,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny float32 model (D 64, 2 blocks): a CPU check")
    parser.add_argument("--variants", default="decode,mixed:256,mixed:128,prefill:256",
                        help="comma-separated: decode, mixed:L[:BACKEND[:CHUNK]], prefill:L[:BACKEND[:CHUNK]]")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--calls", type=int, default=5, help="traced calls per variant")
    parser.add_argument("--reps", type=int, default=10, help="timed runs per variant (wall time, untraced)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    size = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=256) if args.tiny else {}
    dtype = "float32" if args.tiny else "bfloat16"
    model = xLSTMLarge(xLSTMLargeConfig(**size, param_dtype=dtype, compute_dtype=dtype, weight_mode="fused"),
                       rngs=nnx.Rngs(0))
    rows = []
    for variant in args.variants.split(","):
        row = profile(model, variant, args.slots, args.state_dtype, args.calls, args.reps, args.top)
        rows.append(row)
        print(f"{variant}: {row['step_ms']:.2f} ms (± {row['step_iqr_ms']:.2f}; dispatched ahead "
              f"{row['ahead_step_ms']:.2f} ms), device busy "
              f"{row['device_busy_ms']:.2f} ms, host gap {row['host_gap_ms']:.2f} ms, compiled in "
              f"{row['compile_s']:.0f} s", flush=True)
        print("  by kind:  " + ", ".join(f"{k} {v:.3f}" for k, v in row["by_kind_ms"].items()))
        print("  by place: " + ", ".join(f"{p} {v:.3f}" for p, v in row["by_place_ms"].items()))
        for k in row["top_kernels"]:
            print(f"  {k['ms']:8.3f} ms {k['calls']:5.0f}x  {k['kind']:14s} {k['place']:10s} {k['kernel']}")
        if args.json:  # after every variant, so a run cut short keeps what it measured
            with open(args.json, "w") as fh:
                json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, fh,
                          indent=1)
    return rows


if __name__ == "__main__":
    main()
