"""Measure an mlstm_kernels PyTorch kernel (runs only inside the isolated worker; imports torch).

Same method and result keys as `xlstm_jax.bench.measure` (`timed_runs`), with `torch.cuda.synchronize()` in
place of block_until_ready. Peak memory is `torch.cuda.max_memory_allocated()`
after `reset_peak_memory_stats()` (exact); compile_s is the first call (Triton compilation included); xla_mb is
None.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from xlstm_jax.bench.measure import MIN_REPS, load, timed_runs, timing_stats


def measure_torch(spec: dict[str, Any]) -> dict[str, Any]:
    """`spec["options"]["fn"]` (q, k, v, i, f -> h) on CUDA in spec["dtype"]; "fwbw" adds backward of sum(h)."""
    import torch

    if spec["reps"] < MIN_REPS:
        raise ValueError(f"reps must be >= {MIN_REPS} timed runs, got {spec['reps']}.")
    kernel = load(spec["options"]["fn"])
    dtype = getattr(torch, spec["dtype"])
    B, NH, S, DHQK, DHHV = (spec[n] for n in ("B", "NH", "S", "DHQK", "DHHV"))
    params = inspect.signature(kernel).parameters
    kwargs = {k: v for k, v in (("chunk_size", spec["chunk"]), ("autocast_kernel_dtype", dtype)) if k in params}
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, device="cuda", dtype=dt, generator=gen)

    fwbw = spec["mode"] == "fwbw"
    args = [randn(B, NH, S, DHQK), randn(B, NH, S, DHQK), randn(B, NH, S, DHHV),
            randn(B, NH, S, dt=torch.float32), 3.0 + randn(B, NH, S, dt=torch.float32)]
    for a in args:
        a.requires_grad_(fwbw)

    def call():
        h = kernel(*args, **kwargs)
        if fwbw:
            h.float().sum().backward()
            for a in args:
                a.grad = None
        return h

    def wait(_):
        torch.cuda.synchronize()

    start = time.perf_counter()
    wait(call())
    compile_s = time.perf_counter() - start
    seconds, inner = timed_runs(call, wait, spec["reps"])
    return {**timing_stats(seconds), "calls_per_run": inner, "compile_s": compile_s, "xla_mb": None,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20, "peak_exact": True}
