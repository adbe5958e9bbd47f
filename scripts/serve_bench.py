"""Serving under load: the continuous-batching engine of `xlstm-jax serve` against static `Generator` batches.

Requests arrive as a Poisson process at each of several rates (the same requests at every rate, only the arrival
times scale): random prompts of 128-4,096 tokens and 128-512 new tokens (greedy, no stop token, so each request
generates exactly its count), on the xLSTM-7B architecture with random bf16 weights. For each rate:

- the engine (`xlstm_jax.serve.engine.Engine`, driven in process, without HTTP) in real time: throughput (generated
  tokens / time from the first arrival to the last token, and over the saturated part of the run alone:
  `steady_throughput`), time to first token and inter-token latency p50/p99,
  and slot occupancy (the mean share of slots holding a request over the run); and its iterations by kind from
  `Engine.step_log` (`steps`: count, share, p50/p99 of decode steps alone, decode steps with a prefill chunk
  ("mixed"), prefill chunks alone), with `mixed_share`, the mixed steps' share of all decode steps;
- static batches of 16 (`Generator`) in arrival order, each starting when its 16th request has arrived and the
  batch before has finished, prompts padded to the batch's power-of-two length and every row decoding to the
  batch's longest count (rounded up to a multiple of 128): the same figures, on a timeline built from the measured
  duration and per-step times of each batch (which do not depend on the rate); occupancy is the share of decoded
  rows that a request still wanted.

Also: the static batch-16 decode throughput and step time, the unloaded time to first token of a lone request
(the issue's targets compare against these), and the prefill ceiling (`prefill_ceiling`: the throughput no schedule
can pass once every prompt token goes through the model, from what a chunk adds to a step). Writes serve_bench.json
and serve_latency.png (latency and throughput against offered load) to --out.

    python scripts/serve_bench.py --out serve_bench                  # GPU: xLSTM-7B architecture, random weights
    python scripts/serve_bench.py --tiny --out /tmp/serve_bench      # a tiny model on a CPU, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import jax
import numpy as np
from flax import nnx

from xlstm_jax.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.generation import Generator
from xlstm_jax.serve.engine import Engine
from xlstm_jax.serve.metrics import STEP_KINDS
from xlstm_jax.serve.requests import Event, Request, SamplingParams


def _range(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def workload(count: int, prompts: tuple[int, int], new_tokens: tuple[int, int], vocab: int, seed: int
             ) -> list[tuple[list[int], int]]:
    """`count` requests: (random prompt of a length uniform in `prompts`, new tokens uniform in `new_tokens`)."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, rng.integers(prompts[0], prompts[1] + 1)).tolist(),
             int(rng.integers(new_tokens[0], new_tokens[1] + 1))) for _ in range(count)]


def percentiles(values: list[float]) -> dict:
    """p50 and p99 in ms (None without values)."""
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": float(np.percentile(values, 50) * 1e3), "p99_ms": float(np.percentile(values, 99) * 1e3)}


def steady_throughput(token_times: list[list[float]], slots: int) -> float | None:
    """Tokens/s while the server is saturated: from the first token of the `slots`-th request to start (the pool
    is full) to the first token of the last request to start (the queue is empty; after it the pool drains, which
    only a finite workload has). None when fewer than slots + 1 requests ran."""
    firsts = sorted(times[0] for times in token_times)
    if len(firsts) <= slots or firsts[-1] <= firsts[slots - 1]:
        return None
    begin, end = firsts[slots - 1], firsts[-1]
    tokens = sum(np.count_nonzero((np.asarray(times) > begin) & (np.asarray(times) <= end)) for times in token_times)
    return float(tokens / (end - begin))


def summary(arrivals: np.ndarray, token_times: list[list[float]], slots: int) -> dict:
    """Throughput (over the whole run, and `steady_throughput`), TTFT and ITL of requests arriving at `arrivals`
    (s) whose tokens came out at `token_times`, on a server of `slots` rows."""
    end = max(times[-1] for times in token_times)
    tokens = sum(len(times) for times in token_times)
    ttft = [times[0] - arrival for arrival, times in zip(arrivals, token_times)]
    itl = [float(gap) for times in token_times for gap in np.diff(times)]
    return {"tokens_per_s": tokens / (end - arrivals[0]), "steady_tokens_per_s": steady_throughput(token_times, slots),
            "ttft": percentiles(ttft), "itl": percentiles(itl), "makespan_s": end - arrivals[0]}


def step_summary(log: list[tuple[str, float]]) -> dict:
    """Per kind of engine iteration (`Engine.step_log`): count, share of the iterations, p50 / p99 in ms."""
    seconds = {kind: [s for k, s in log if k == kind] for kind in STEP_KINDS}
    return {kind: {"count": len(values), "share": len(values) / max(1, len(log)), **percentiles(values)}
            for kind, values in seconds.items()}


def run_engine(engine: Engine, work: list[tuple[list[int], int]], arrivals: np.ndarray) -> dict:
    """Submit each request at its arrival time (real time) and record when each token came out, and the engine's
    iterations by kind (`step_summary`, `mixed_share`: mixed steps / decode steps of either kind)."""
    times: list[list[float]] = [[] for _ in work]
    finished = threading.Semaphore(0)

    def receiver(index: int):
        def on_event(event: Event) -> None:
            times[index].extend([time.perf_counter()] * len(event.token_ids))
            if event.finish_reason is not None:
                finished.release()
        return on_event

    samples, running = [], threading.Event()
    running.set()

    def sample_occupancy() -> None:
        while running.is_set():
            samples.append(engine.stats()["active"] / engine.max_slots)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_occupancy, daemon=True)
    engine.step_log.clear()
    start = time.perf_counter()
    sampler.start()
    for index, ((prompt, count), arrival) in enumerate(zip(work, arrivals)):
        delay = start + arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        engine.submit([Request(prompt, SamplingParams(max_tokens=count), receiver(index))])
    for _ in work:
        finished.acquire()
    running.clear()
    sampler.join()
    result = summary(arrivals, [[t - start for t in ts] for ts in times], engine.max_slots)
    result["occupancy"] = float(np.mean(samples))
    steps = result["steps"] = step_summary(list(engine.step_log))
    decoded = steps["decode"]["count"] + steps["mixed"]["count"]
    result["mixed_share"] = steps["mixed"]["count"] / decoded if decoded else None
    return result


class StepClock:
    """`Generator`'s on_token: the host time of every decode step of the call under way."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, tokens) -> None:
        self.times.append(time.perf_counter())


def static_batches(generator: Generator, work: list[tuple[list[int], int]], batch: int, quantum: int,
                   vocab: int) -> list[dict]:
    """Run the requests in batches of `batch` (arrival order) once each shape is compiled; per batch its requests,
    duration and step times (s from the call's start)."""
    clock, runs, rng = StepClock(), [], np.random.default_rng(1)
    shapes = []
    for first in range(0, len(work), batch):
        rows = work[first:first + batch]
        length = 1 << (max(len(p) for p, _ in rows) - 1).bit_length()
        steps = -(-max(n for _, n in rows) // quantum) * quantum
        shapes.append((list(range(first, first + len(rows))), length, steps))
    for _, length, steps in sorted({(s[1], s[2]): s for s in shapes}.values(), key=lambda s: s[1:]):
        generator(rng.integers(0, vocab, (batch, length)), max_new_tokens=steps, on_token=clock)  # compile
    for indices, length, steps in shapes:
        clock.times = []
        start = time.perf_counter()
        generator(rng.integers(0, vocab, (batch, length)), max_new_tokens=steps, on_token=clock)
        runs.append({"requests": indices, "duration_s": time.perf_counter() - start,
                     "steps_s": [t - start for t in clock.times], "rows": batch, "length": length})
    return runs


def static_timeline(runs: list[dict], work: list[tuple[list[int], int]], arrivals: np.ndarray) -> dict:
    """The static server's figures at these arrivals: batch b starts when its last request has arrived and batch
    b - 1 has finished; a request's tokens are its batch's first `count` steps."""
    token_times: list[list[float]] = [[] for _ in work]
    free = 0.0
    for run in runs:
        start = max(free, arrivals[run["requests"][-1]])
        for index in run["requests"]:
            token_times[index] = [start + t for t in run["steps_s"][:work[index][1]]]
        free = start + run["duration_s"]
    decoded = sum(r["rows"] * len(r["steps_s"]) for r in runs)
    return {**summary(arrivals, token_times, runs[0]["rows"]), "occupancy": sum(n for _, n in work) / decoded}


def unloaded_ttft(engine: Engine, work: list[tuple[list[int], int]]) -> dict:
    """Time to first token of each request's prompt run alone on the idle engine: p50 / p99 in ms."""
    return percentiles([run_engine(engine, [(prompt, 1)], np.zeros(1))["ttft"]["p50_ms"] / 1e3
                        for prompt, _ in work])


def prefill_ceiling(results: dict, work: list[tuple[list[int], int]], chunk: int) -> dict | None:
    """The most tokens/s any schedule of this workload can generate on the slots, every prompt token passing through
    the model once: the static decode rate x D / (D + P), D the decode time of every generated token at the static
    rate, P the prompt chunks' time, each costing what a chunk adds to a decode step (mixed p50 - decode p50 of the
    saturated run). None without both kinds of step."""
    steps = results["saturation"]["engine"]["steps"]
    if not (steps["mixed"]["count"] and steps["decode"]["count"]):
        return None
    per_chunk = max(0.0, steps["mixed"]["p50_ms"] - steps["decode"]["p50_ms"]) / 1e3
    rate = results["static_decode_tokens_per_s"]
    decode = sum(n for _, n in work) / rate
    prefill = sum(-(-(len(p) - 1) // chunk) for p, _ in work) * per_chunk
    return {"chunk_ms": per_chunk * 1e3, "tokens_per_s": rate * decode / (decode + prefill),
            "share_of_static": decode / (decode + prefill)}


def targets(results: dict) -> dict:
    """The issue's targets, each as (measured, bound, met): throughput at saturation (`steady_throughput` of the
    run with every request at once) >= 90% of the static batch's decode throughput, p99 inter-token latency at
    saturation <= 2 static steps, time to first token p50 at half of saturation <= 2x the unloaded one."""
    saturated = results["saturation"]["engine"]
    half = next(r for r in results["rates"] if r["load"] == 0.5)["engine"]
    rate = saturated["steady_tokens_per_s"] or saturated["tokens_per_s"]
    checks = {"throughput_tokens_per_s": (rate, 0.9 * results["static_decode_tokens_per_s"]),
              "itl_p99_ms": (saturated["itl"]["p99_ms"], 2 * results["static_step_ms"]),
              "ttft_p50_half_load_ms": (half["ttft"]["p50_ms"], 2 * results["unloaded_ttft_ms"]["p50_ms"])}
    return {name: {"measured": got, "bound": bound,
                   "met": bool(got >= bound if name.startswith("throughput") else got <= bound)}
            for name, (got, bound) in checks.items()}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in results["rates"]]
    ax_load = "offered load (requests/s)"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind, style in (("engine", "-"), ("static", "--")):
        for metric, ax in (("ttft", axes[0]), ("itl", axes[1])):
            for q, marker in (("p50_ms", "o"), ("p99_ms", "^")):
                ax.plot(rates, [r[kind][metric][q] for r in results["rates"]], style, marker=marker,
                        label=f"{kind} {q[:3]}")
        axes[2].plot(rates, [r[kind]["tokens_per_s"] for r in results["rates"]], style, marker="o", label=kind)
    for ax, title in zip(axes, ("time to first token (ms)", "inter-token latency (ms)", "throughput (tokens/s)")):
        ax.set_xlabel(ax_load)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_yscale("log")
    fig.suptitle(f"xlstm-jax serve, {results['device']}: {results['max_slots']} slots vs static batches of "
                 f"{results['static_batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(kind: str, figures: dict) -> str:
    steady = figures["steady_tokens_per_s"]
    return (f"{kind} {figures['tokens_per_s']:9,.0f} tok/s (saturated {steady or float('nan'):9,.0f}) TTFT p50/p99 "
            f"{figures['ttft']['p50_ms']:8.1f}/"
            f"{figures['ttft']['p99_ms']:8.1f} ms ITL p50/p99 {figures['itl']['p50_ms']:7.2f}/"
            f"{figures['itl']['p99_ms']:7.2f} ms occupancy {figures['occupancy']:.2f}")


def step_report(figures: dict) -> str:
    """The engine run's iterations by kind, for the line below its figures."""
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    kinds = " | ".join(f"{kind} {f['count']} ({f['share']:.0%}) p50/p99 {number(f['p50_ms'])}/{number(f['p99_ms'])} ms"
                       for kind, f in figures["steps"].items())
    return f"    engine steps: {kinds} | mixed_share {number(figures['mixed_share'])}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and small requests (CPU, under a minute)")
    parser.add_argument("--loads", type=lambda t: [float(x) for x in t.split(",")], default=[0.25, 0.5, 0.75, 1.25],
                        help="offered loads as fractions of the saturation rate (0.5 is always run)")
    parser.add_argument("--requests", type=int, help="requests per rate")
    parser.add_argument("--prompt-tokens", type=_range, help="LOW,HIGH prompt lengths")
    parser.add_argument("--new-tokens", type=_range, help="LOW,HIGH generated tokens per request")
    parser.add_argument("--max-slots", type=int, default=16)
    parser.add_argument("--static-batch", type=int, default=16)
    parser.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--prefill-chunk", type=int, help="the engine's prefill chunk (tokens)")
    parser.add_argument("--prefill-backend", help="the prompt chunks' mLSTM cells (Engine's prefill_backend; "
                        "mlstm_prefill: the forward-only fused kernel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="serve_bench", help="folder for serve_bench.json and serve_latency.png")
    args = parser.parse_args(argv)
    tiny = args.tiny
    loads = sorted({*args.loads, 0.5})
    count = args.requests or (24 if tiny else 64)
    prompts = args.prompt_tokens or ((16, 128) if tiny else (128, 4096))
    new_tokens = args.new_tokens or ((8, 32) if tiny else (128, 512))
    prefill_chunk = args.prefill_chunk or (32 if tiny else 256)
    quantum = 8 if tiny else 128
    size = dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=256) if tiny else {}
    dtype = "float32" if tiny else "bfloat16"
    config = xLSTMLargeConfig(**size, param_dtype=dtype, compute_dtype=dtype, weight_mode="fused")
    model = xLSTMLarge(config, rngs=nnx.Rngs(0))
    V = config.vocab_size
    engine = Engine(model, max_slots=args.max_slots, max_queue=count, state_dtype=args.state_dtype,
                    prefill_chunk=prefill_chunk, prefix_cache_mb=0,  # random prompts share no prefix
                    prefill_backend=args.prefill_backend)
    began = time.perf_counter()
    engine.warm_up()
    print(f"engine compiled ({len(engine.buckets)} prefill lengths, alone and with the step) in "
          f"{time.perf_counter() - began:.1f} s", flush=True)
    engine.start()
    work = workload(count, prompts, new_tokens, V, args.seed)
    runs = static_batches(Generator(model), work, args.static_batch, quantum, V)
    longest = max(runs, key=lambda r: len(r["steps_s"]))
    step_s = float(np.median(np.diff(longest["steps_s"])))
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "tiny": tiny,
               "max_slots": args.max_slots, "static_batch": args.static_batch, "state_dtype": args.state_dtype,
               "prefill_chunk": prefill_chunk, "prefill_backend": args.prefill_backend, "requests": count,
               "prompt_tokens": prompts, "new_tokens": new_tokens,
               "static_step_ms": step_s * 1e3, "static_decode_tokens_per_s": args.static_batch / step_s,
               "unloaded_ttft_ms": unloaded_ttft(engine, work), "rates": []}
    print(f"static batch {args.static_batch}: {step_s * 1e3:.2f} ms/step, "
          f"{results['static_decode_tokens_per_s']:,.0f} decode tok/s; unloaded TTFT p50/p99 "
          f"{results['unloaded_ttft_ms']['p50_ms']:.1f}/{results['unloaded_ttft_ms']['p99_ms']:.1f} ms", flush=True)
    os.makedirs(args.out, exist_ok=True)

    def save():  # after every stage, so a run cut short keeps what it measured
        with open(os.path.join(args.out, "serve_bench.json"), "w") as fh:
            json.dump(results, fh, indent=1)

    save()
    zero = np.zeros(count)
    results["saturation"] = {"engine": run_engine(engine, work, zero), "static": static_timeline(runs, work, zero)}
    saturation = count / results["saturation"]["engine"]["makespan_s"]
    results["saturation_rate"] = saturation
    print(f"saturation (every request at once): {saturation:.2f} req/s | "
          + " | ".join(report(k, results["saturation"][k]) for k in ("engine", "static")), flush=True)
    print(step_report(results["saturation"]["engine"]), flush=True)
    ceiling = results["prefill_ceiling"] = prefill_ceiling(results, work, prefill_chunk)
    if ceiling is not None:
        print(f"prefill ceiling: a chunk adds {ceiling['chunk_ms']:.2f} ms to a step; no schedule generates more "
              f"than {ceiling['tokens_per_s']:,.0f} tok/s = {ceiling['share_of_static']:.0%} of the static decode "
              "rate on this workload", flush=True)
    gaps = np.random.default_rng(args.seed + 1).exponential(1.0, count)
    for load in loads:
        rate = load * saturation
        arrivals = np.cumsum(gaps) / rate - gaps[0] / rate  # the first request arrives at 0
        row = {"load": load, "rate": rate, "engine": run_engine(engine, work, arrivals),
               "static": static_timeline(runs, work, arrivals)}
        results["rates"].append(row)
        save()
        print(f"load {load:4.2f} = {rate:6.2f} req/s | " + " | ".join(report(k, row[k]) for k in ("engine", "static")),
              flush=True)
        print(step_report(row["engine"]), flush=True)
    engine.stop()
    results["targets"] = targets(results)
    for name, check in results["targets"].items():
        print(f"target {name}: {check['measured']:,.1f} vs bound {check['bound']:,.1f}: "
              f"{'met' if check['met'] else 'NOT met'}", flush=True)
    save()
    plot(results, os.path.join(args.out, "serve_latency.png"))
    print(f"wrote {os.path.join(args.out, 'serve_bench.json')} and serve_latency.png", flush=True)


if __name__ == "__main__":
    main()
