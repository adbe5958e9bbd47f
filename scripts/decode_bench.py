"""Decoding on one GPU, measured in one run: the mLSTM step, short sequences, and the xLSTM-7B decode step.

1. `xlstm_jax.mlstm_step` (native, triton; float32 and bfloat16 states) and the seed's `recurrent_step_fw` at
   B=16, NH=8, DHQK=256, DHHV=512, bf16 inputs, per step of a 16-step loop; for the Triton step also the kernel's
   own GPU time (profiler trace), and on a GPU a sweep of its tiles, warps and pipeline stages;
2. `mlstm` forward for short S (1..64) with native_recurrent (what "auto" picks up to SHORT_SEQUENCE) and the
   limit-chunk kernel, same shape;
3. one token of the xLSTM-7B architecture (bf16 weights, random; `--weights bf16 int8 fp8` adds weight-only
   quantized copies to this part and the next) at batch 1 and 16, `model(token, states)` under
   jit with each step backend: ms per token and tokens/s (part "model");
4. generation (`Generator`) with that model (128-token prompt, "mlstm_step" steps): ms per generated token at
   batch 1 and 16, as (time of 2 + 128 tokens - time of 2) / 128 (part "generate");
5. the time to the first token at 128, 2,048 and 8,192 prompt tokens, batch 1 (a `Generator` call), and the host
   time of the model's `nnx.split`, which a plain `generate` call adds (part "first_token").
Medians of >= 10 timed calls after warm-up (`xlstm_jax.bench.measure.time_jax`); of 3 for `generate`.

    python scripts/decode_bench.py --json decode.json        # --tiny: small shapes, e.g. on a CPU
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from xlstm_jax import mlstm, mlstm_step
from xlstm_jax.bench.measure import time_jax
from xlstm_jax.bench.trace import traced_events
from xlstm_jax.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.generation import STATE_DTYPES, Generator
from xlstm_jax.models.xlstm_large.model import zero_states
from xlstm_jax.models.xlstm_large.quantize import quantize
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent import recurrent_step_fw

STEPS = 16  # steps per timed call: a fori_loop carries the states, as a decode loop does (no copy of C per step)


def _steps(step_fn):
    """STEPS steps of `step_fn(q, k, v, i, f, c, n, m)` carrying (c, n, m); returns the last h and states."""
    def run(q, k, v, i, f, c, n, m):
        def body(_, carry):
            return step_fn(q, k, v, i, f, *carry[1])
        h0 = jnp.zeros(v.shape, v.dtype)
        return jax.lax.fori_loop(0, STEPS, body, (h0, (c, n, m)))
    return run


def _kernel_us(fn, args) -> float | None:
    """Median GPU time of the Triton step kernel's launches in one traced call of jit(fn), µs (None off GPUs, or for
    a backend without the kernel)."""
    if jax.default_backend() != "gpu":
        return None
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = sorted(e["dur"] for e in traced_events(lambda: compiled(*args)) if "_step_kernel" in e["name"])
    return float(times[len(times) // 2]) if times else None


def step_rows(B, NH, DHQK, DHHV, backends, reps, sweep):
    keys = jax.random.split(jax.random.key(0), 8)
    q, k = (jax.random.normal(x, (B, NH, DHQK), jnp.bfloat16) for x in keys[:2])
    v = jax.random.normal(keys[2], (B, NH, DHHV), jnp.bfloat16)
    i, f = (jax.random.normal(x, (B, NH)) for x in keys[3:5])
    c = jax.random.normal(keys[5], (B, NH, DHQK, DHHV))
    n, m = jax.random.normal(keys[6], (B, NH, DHQK)), jnp.zeros((B, NH))
    rows = []

    def add(what, fn, state_dtype):
        args = (q, k, v, i, f, c.astype(state_dtype), n.astype(state_dtype), m)
        t = time_jax(_steps(fn), lambda: args, reps)
        rows.append({"what": what, "states": jnp.dtype(state_dtype).name, "us": 1e3 * t["ms_median"] / STEPS,
                     "kernel_us": _kernel_us(_steps(fn), args)})

    for backend in backends:
        for state_dtype in (jnp.float32, jnp.bfloat16):
            add(f"mlstm_step {backend}", lambda *a, b=backend: mlstm_step(*a, backend=b), state_dtype)
    for bv, bk, warps, stages in sweep:
        from xlstm_jax.kernels.triton.step import step_triton

        add(f"triton BV{bv} BK{bk} w{warps} s{stages}",
            lambda q, k, v, i, f, c, n, m, s=(bv, bk, warps, stages): step_triton(
                q, k, v, c, n, m, i, f, 1e-6, block_v=s[0], block_k=s[1], num_warps=s[2], num_stages=s[3]),
            jnp.float32)

    def seed(q, k, v, i, f, c, n, m):
        h, (c, n, m) = recurrent_step_fw(c, n, m[..., None], q, k, v, i[..., None], f[..., None])
        return h, (c, n, m[..., 0])

    add("recurrent_step_fw (seed)", seed, jnp.float32)
    return rows


def short_rows(B, NH, DHQK, DHHV, lengths, backends, reps):
    rows = []
    for S in lengths:
        keys = jax.random.split(jax.random.key(S), 5)
        q, k = (jax.random.normal(x, (B, NH, S, DHQK), jnp.bfloat16) for x in keys[:2])
        v = jax.random.normal(keys[2], (B, NH, S, DHHV), jnp.bfloat16)
        i, f = (jax.random.normal(x, (B, NH, S)) for x in keys[3:])
        for backend in backends:
            t = time_jax(lambda *a, b=backend: mlstm(*a, backend=b, return_last_states=True),
                         lambda a=(q, k, v, i, f): a, reps)
            rows.append({"S": S, "backend": backend, "us": 1e3 * t["ms_median"]})
    return rows


def _kernels(compiled_text: str) -> int:
    """Kernel launches of a compiled program, roughly: fusions, custom calls and library matmuls of its entry."""
    entry = compiled_text[compiled_text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    return sum(any(op in line for op in (" fusion(", "custom-call(", " dot(")) for line in entry.splitlines())


def model_rows(model, batches, step_backends, reps):
    """One jitted token step per batch size and step backend: ms per token and the kernels it launches."""
    config = model.config
    graphdef, params = nnx.split(model)

    def one_token(params, token, states, backend):
        return nnx.merge(graphdef, params)(token[:, None], states=states, return_states=True, backend=backend)

    rows = []
    for B in batches:
        token, states = jnp.zeros((B,), jnp.int32), zero_states(config, B)
        for backend in step_backends:
            fn = lambda p, tok, st, b=backend: one_token(p, tok, st, b)  # noqa: E731
            t = time_jax(fn, lambda: (params, token, states), reps)
            kernels = _kernels(jax.jit(fn).lower(params, token, states).compile().as_text())
            rows.append({"B": B, "what": "one jitted step", "step_backend": backend, "ms_per_token": t["ms_median"],
                         "tokens_per_s": B / (t["ms_median"] / 1e3), "kernels": kernels})
    return rows


def _generate_seconds(serve: Generator, batch, prompt_len, new_tokens, state_dtype="float32"):
    """Median of 3 timed calls of a `Generator` (after one that compiles), seconds."""
    prompts = [[1] * prompt_len] * batch
    serve(prompts, max_new_tokens=new_tokens, step_backend="mlstm_step", state_dtype=state_dtype)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        serve(prompts, max_new_tokens=new_tokens, step_backend="mlstm_step", state_dtype=state_dtype)
        runs.append(time.perf_counter() - start)
    return sorted(runs)[1]


def generate_rows(model, batches, prompt_len, new_tokens, state_dtype="float32"):
    """The generation loop: per token = (time of 2 + new_tokens - time of 2) / new_tokens."""
    rows, serve = [], Generator(model)
    for B in batches:
        short, long = (_generate_seconds(serve, B, prompt_len, n, state_dtype) for n in (2, 2 + new_tokens))
        per_token = (long - short) / new_tokens
        rows.append({"B": B, "what": f"generate, {prompt_len}-token prompt", "state_dtype": state_dtype,
                     "ms_per_token": 1e3 * per_token, "tokens_per_s": B / per_token})
    return rows


def first_token_rows(model, lengths):
    """The time to the first token (a call of one `Generator`: prefill + one sampled token, batch 1) per prompt
    length, and the host time of the model's `nnx.split` that a `generate` call pays on top."""
    serve = Generator(model)
    rows = [{"B": 1, "what": "time to first token", "prompt": n, "ms": 1e3 * _generate_seconds(serve, 1, n, 1)}
            for n in lengths]
    splits = []
    for _ in range(5):
        start = time.perf_counter()
        nnx.split(model)
        splits.append(time.perf_counter() - start)
    rows.append({"what": "nnx.split of the model (host)", "ms": 1e3 * sorted(splits)[2]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes and a tiny model")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--parts", nargs="+", default=["step", "short", "model", "generate", "first_token"],
                        choices=["step", "short", "model", "generate", "first_token"])
    parser.add_argument("--weight-mode", default="fused", choices=["single", "fused"],
                        help="the model's weight layout (fused: q|k|v|o, i|f and the FFN's gate|up in one matrix)")
    parser.add_argument("--state-dtype", default="float32", choices=STATE_DTYPES,
                        help="the decode states C and n between steps of the generate part (Generator's state_dtype)")
    parser.add_argument("--weights", nargs="+", default=["bf16"], choices=["bf16", "int8", "fp8"],
                        help="the model and generate parts with these weights (int8 / fp8: weight-only quantized "
                             "projections and LM head, `xlstm_jax.models.xlstm_large.quantize`)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    gpu = jax.default_backend() == "gpu"
    heads = (2, 2, 16, 32) if args.tiny else (16, 8, 256, 512)
    step_backends = ["native", "triton"] if gpu else ["native"]
    chunked = ["native_recurrent", "triton_limit_chunk" if gpu else "native_chunkwise"]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if "step" in args.parts:
        sweep = [(bv, bk, w, st) for bv in (32, 64, 128) for bk in (64, 128) for w in (4, 8) for st in (1, 3)]
        results["step"] = step_rows(*heads, step_backends, args.reps, sweep if gpu else [])
        for row in results["step"]:
            kernel = "" if row["kernel_us"] is None else f"  kernel {row['kernel_us']:6.1f} us"
            print(f"step  {row['what']:30s} states {row['states']:9s} {row['us']:8.1f} us{kernel}", flush=True)
    if "short" in args.parts:
        results["short"] = short_rows(*heads, (1, 4, 8, 16, 32, 64), chunked, args.reps)
        for row in results["short"]:
            print(f"short S={row['S']:<3d} {row['backend']:20s} {row['us']:8.1f} us", flush=True)
    if {"model", "generate", "first_token"} & set(args.parts):
        size = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=256) if args.tiny else {}
        config = xLSTMLargeConfig(**size, param_dtype="bfloat16", compute_dtype="bfloat16",
                                  weight_mode=args.weight_mode)
        model = xLSTMLarge(config, rngs=nnx.Rngs(0))
        results["weight_mode"] = args.weight_mode
        weighted = {w: model if w == "bf16" else quantize(model, w) for w in args.weights}
    if "model" in args.parts:
        results["model"] = [dict(row, weights=w) for w, m in weighted.items()
                            for row in model_rows(m, (1, 16), ["mlstm_step", "native_recurrent"], args.reps)]
        for row in results["model"]:
            print(f"model B={row['B']:<3d} {row['weights']:4s} {row['step_backend']:17s} {row['ms_per_token']:7.3f} "
                  f"ms/token {row['tokens_per_s']:9,.0f} tok/s  {row['kernels']} kernels", flush=True)
    if "generate" in args.parts:
        results["generate"] = [dict(row, weights=w) for w, m in weighted.items()
                               for row in generate_rows(m, (1, 16), 8 if args.tiny else 128,
                                                        4 if args.tiny else 128, args.state_dtype)]
        for row in results["generate"]:
            print(f"generate B={row['B']:<3d} {row['weights']:4s} {row['what']}: {row['ms_per_token']:.3f} ms/token "
                  f"{row['tokens_per_s']:,.0f} tok/s", flush=True)
    if "first_token" in args.parts:
        results["first_token"] = first_token_rows(model, (8, 32) if args.tiny else (128, 2048, 8192))
        for row in results["first_token"]:
            where = f"{row['prompt']:5d}-token prompt" if "prompt" in row else row["what"]
            print(f"first token, {where}: {row['ms']:.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
