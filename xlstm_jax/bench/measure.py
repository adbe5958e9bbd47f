"""Measure one case in this process: jit once, warm up, time >= 10 calls with block_until_ready.

Every `measure_*` function takes the spec of `xlstm_jax.bench.cases.Case.spec` and returns
{"ms_median", "ms_min", "ms_max", "ms_iqr", "calls_per_run", "compile_s", "xla_mb", "peak_mb", "peak_exact"}:
- times of the compiled call in milliseconds (median, extremes and interquartile range over `reps` timed runs,
  after WARMUP untimed calls). A timed run is `calls_per_run` back-to-back calls and one block_until_ready,
  divided by that count: 1 unless a call takes less than MIN_RUN_S, so that the host's wait for the device does
  not dominate sub-millisecond calls (the decode step);
- compile_s: lowering + compilation time;
- xla_mb: XLA's static estimate of the executable's memory (arguments + outputs + temporaries - aliased);
- peak_mb: `device.memory_stats()["peak_bytes_in_use"]` after the case (None where the device has no memory
  stats, e.g. CPU). JAX cannot reset that peak, so it is this case's own peak only if it rose during the case
  (peak_exact true; always so in a fresh subprocess); otherwise it is an upper bound.
"""

from __future__ import annotations

import importlib
import inspect
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

WARMUP = 3
MIN_REPS = 10
MIN_RUN_S = 2e-3  # shortest timed run; shorter calls are repeated within one run
MAX_CALLS_PER_RUN = 100


def load(target: str) -> Callable[..., Any]:
    """Import "module:function"."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def calls_per_run(seconds_per_call: float) -> int:
    """How many back-to-back calls make one timed run of at least MIN_RUN_S (at most MAX_CALLS_PER_RUN)."""
    return max(1, min(MAX_CALLS_PER_RUN, int(MIN_RUN_S / max(seconds_per_call, 1e-9)) + 1))


def timed_runs(call: Callable[[], Any], wait: Callable[[Any], Any], reps: int,
               calls: int | None = None) -> tuple[list[float], int]:
    """Per-call seconds of `reps` timed runs of `call` (after WARMUP untimed calls), and the calls per run.

    The calls per run are `calls` (e.g. the steps a loop dispatches before it waits) or come from the fastest
    warm-up call after the first (which may compile), so that one call slowed by a busy host does not make short
    calls look long.
    """
    probes = []
    for _ in range(WARMUP):
        start = time.perf_counter()
        wait(call())
        probes.append(time.perf_counter() - start)
    inner = calls or calls_per_run(min(probes[1:] or probes))
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = call()
        wait(out)
        seconds.append((time.perf_counter() - start) / inner)
    return seconds, inner


def timing_stats(seconds: list[float]) -> dict[str, float]:
    """Median, min, max and interquartile range (p75 - p25) of per-call times, in milliseconds."""
    ms = np.asarray(seconds) * 1e3
    p25, p75 = np.percentile(ms, [25, 75])
    return {"ms_median": float(statistics.median(ms)), "ms_min": float(ms.min()), "ms_max": float(ms.max()),
            "ms_iqr": float(p75 - p25)}


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _xla_bytes(compiled: Any) -> float | None:
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if m is None:
        return None
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def time_jax(fn: Callable[..., Any], make_args: Callable[[], tuple], reps: int) -> dict[str, Any]:
    """Compile `fn` once for the arguments `make_args()` builds, warm up and time `reps` calls."""
    if reps < MIN_REPS:
        raise ValueError(f"reps must be >= {MIN_REPS} timed runs, got {reps}.")
    before = peak_bytes()
    args = make_args()
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    seconds, inner = timed_runs(lambda: compiled(*args), jax.block_until_ready, reps)
    memory = memory_mb(before, compiled)
    del args, compiled
    return {**timing_stats(seconds), "calls_per_run": inner, "compile_s": compile_s, **memory}


def memory_mb(before: int | None, compiled: Any) -> dict[str, Any]:
    """xla_mb, peak_mb and peak_exact (module docstring) of a case run with `compiled`, the device's peak having
    been `before` (`peak_bytes()`) when the case began."""
    after, xla = peak_bytes(), _xla_bytes(compiled)
    return {"xla_mb": None if xla is None else xla / 2**20, "peak_mb": None if after is None else after / 2**20,
            "peak_exact": after is not None and (before is None or after > before)}


def mlstm_inputs(B: int, NH: int, S: int, DHQK: int, DHHV: int, dtype: Any, seed: int = 0) -> tuple:
    """q, k (B, NH, S, DHQK) and v (B, NH, S, DHHV) standard normal in `dtype`; i ~ N(0, 1), f ~ 3 + N(0, 1)
    (B, NH, S) float32."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(keys[0], (B, NH, S, DHQK), dtype)
    k = jax.random.normal(keys[1], (B, NH, S, DHQK), dtype)
    v = jax.random.normal(keys[2], (B, NH, S, DHHV), dtype)
    i = jax.random.normal(keys[3], (B, NH, S), jnp.float32)
    f = 3.0 + jax.random.normal(keys[4], (B, NH, S), jnp.float32)
    return q, k, v, i, f


def with_mode(fw: Callable[..., Any], mode: str, n_args: int) -> Callable[..., Any]:
    """fw itself ("fw"), or the gradient of sum(fw(...)) (in float32) with respect to every argument ("fwbw")."""
    if mode == "fw":
        return fw
    if mode != "fwbw":
        raise ValueError(f"mode must be 'fw' or 'fwbw', got {mode!r}.")

    def loss(*args):
        return jnp.sum(fw(*args).astype(jnp.float32))

    return jax.grad(loss, argnums=tuple(range(n_args)))


def _dims(spec: dict[str, Any]) -> tuple[int, int, int, int, int]:
    return spec["B"], spec["NH"], spec["S"], spec["DHQK"], spec["DHHV"]


def measure_mlstm(spec: dict[str, Any]) -> dict[str, Any]:
    """`xlstm_jax.mlstm` with backend `spec["options"]["backend"]` and chunk size `spec["chunk"]`."""
    from xlstm_jax.mlstm import mlstm

    backend, chunk = spec["options"]["backend"], spec["chunk"]

    def fw(q, k, v, i, f):
        return mlstm(q, k, v, i, f, backend=backend, chunk_size=chunk)

    dtype = jnp.dtype(spec["dtype"])
    return time_jax(with_mode(fw, spec["mode"], 5), lambda: mlstm_inputs(*_dims(spec), dtype), spec["reps"])


def _accepted(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def measure_upstream_jax(spec: dict[str, Any]) -> dict[str, Any]:
    """An mlstm_kernels JAX sequence kernel `spec["options"]["fn"]` (q, k, v, i, f -> h), in the input dtype."""
    kernel = load(spec["options"]["fn"])
    dtype = jnp.dtype(spec["dtype"])
    kwargs = _accepted(kernel, chunk_size=spec["chunk"], autocast_kernel_dtype=dtype)

    def fw(q, k, v, i, f):
        return kernel(q, k, v, i, f, **kwargs)

    return time_jax(with_mode(fw, spec["mode"], 5), lambda: mlstm_inputs(*_dims(spec), dtype), spec["reps"])


def measure_attention(spec: dict[str, Any]) -> dict[str, Any]:
    """`jax.nn.dot_product_attention(implementation="cudnn")`, causal, q, k, v (B, S, NH, DH) in the input dtype."""
    B, NH, S, DH, _ = _dims(spec)
    dtype = jnp.dtype(spec["dtype"])

    def make_args():
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        return tuple(jax.random.normal(key, (B, S, NH, DH), dtype) for key in keys)

    def fw(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    return time_jax(with_mode(fw, spec["mode"], 3), make_args, spec["reps"])


def seed_order_mlstm_step(c, n, m, q, k, v, i, f):
    """`xlstm_jax.mlstm_step` (backend "auto": the fused Triton step on a GPU) called with the seed step's
    arguments and shapes (m, i, f (B, NH, 1)), for the decode preset."""
    from xlstm_jax.mlstm.step import mlstm_step

    h, (c, n, m) = mlstm_step(q, k, v, i[..., 0], f[..., 0], c, n, m[..., 0])
    return h, (c, n, m[..., None])


def measure_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """One recurrent step: `spec["options"]["fn"]` (default xlstm_jax's `recurrent_step_fw`) with float32 states
    C (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH, 1); q, k, v in the input dtype; i, f (B, NH, 1) float32.
    Forward only."""
    step = load(spec["options"].get(
        "fn", "xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend.recurrent:recurrent_step_fw"))
    B, NH, _, DHQK, DHHV = _dims(spec)
    dtype = jnp.dtype(spec["dtype"])

    def make_args():
        keys = jax.random.split(jax.random.PRNGKey(0), 8)
        f32 = jnp.float32
        return (
            jax.random.normal(keys[0], (B, NH, DHQK, DHHV), f32),
            jax.random.normal(keys[1], (B, NH, DHQK), f32),
            jax.random.normal(keys[2], (B, NH, 1), f32),
            jax.random.normal(keys[3], (B, NH, DHQK), dtype),
            jax.random.normal(keys[4], (B, NH, DHQK), dtype),
            jax.random.normal(keys[5], (B, NH, DHHV), dtype),
            jax.random.normal(keys[6], (B, NH, 1), f32),
            3.0 + jax.random.normal(keys[7], (B, NH, 1), f32),
        )

    return time_jax(step, make_args, spec["reps"])
