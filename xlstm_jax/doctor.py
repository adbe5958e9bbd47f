"""`xlstm-jax doctor`: versions, known-bad combinations, runnable backends and a float64 parity check of each.

The parity check runs every runnable backend through `xlstm_jax.mlstm` (float32 inputs, initial states,
return_last_states) forward and backward, and compares h, the last states (C, n, m) and the gradients of
q, k, v, i, f, c_initial, n_initial, m_initial under the loss sum(W_h*h) + sum(W_C*C) + sum(W_n*n) + sum(W_m*m)
(random weights) with the float64 recurrence of `xlstm_jax.mlstm.reference`. The decode step
(`xlstm_jax.mlstm_step`, each runnable step backend) is compared the same way, forward: h and the new states after
two steps from random states, the state updated in place by the Triton kernel (a wrong launch once returned NaN
there on a GPU while every chunkwise check passed).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from xlstm_jax import compat
from xlstm_jax.kernels.launch import triton_availability
from xlstm_jax.mlstm import api
from xlstm_jax.mlstm.reference import mlstm_recurrent_reference
from xlstm_jax.mlstm.step import mlstm_step

FW_TOL = 1e-4  # relative Frobenius error of h and of each last state (float32 inputs)
BW_TOL = 1e-3  # relative Frobenius error of each gradient
STATE_NAMES = ("c_initial", "n_initial", "m_initial")


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity problem, small enough for every backend (the Triton kernels take any head dims up to 1024)."""

    B: int
    NH: int
    S: int
    DHQK: int
    DHHV: int
    chunk_size: int | None
    with_state: bool
    igate: tuple[float, float]
    fgate: tuple[float, float]


QUICK_CASES = (Case(1, 2, 20, 16, 32, 16, True, (-3.0, 3.0), (-1.0, 6.0)),)
FULL_CASES = QUICK_CASES + (Case(2, 2, 70, 32, 48, 32, False, (-8.0, 8.0), (-4.0, 8.0)),)


@dataclasses.dataclass
class Result:
    """Parity of one backend: max relative errors over the cases, or why it did not run."""

    name: str
    status: str  # "PASS" | "FAIL"
    h_err: float = float("nan")
    state_err: float = float("nan")
    grad_err: float = float("nan")
    worst_grad: str = ""
    note: str = ""
    seconds: float = 0.0


def backend_availability(name: str) -> tuple[bool, str]:
    """(runnable, why) for one entry of `xlstm_jax.mlstm.IMPLEMENTATIONS`."""
    impl = api.IMPLEMENTATIONS[name]
    if impl.needs_triton:
        try:
            ok, why = api.triton_status()
        except ImportError as exc:
            return False, f"launch layer missing ({exc})"
        return ok, why
    return True, f"XLA on {jax.default_backend()}"


def _inputs(case: Case, seed: int, dtype: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """q, k, v rounded to `dtype` (so the float64 reference sees the same values); gates, states, weights float32."""
    rng = np.random.default_rng(seed)
    B, NH, S, DK, DV = case.B, case.NH, case.S, case.DHQK, case.DHHV
    x = {
        "q": rng.standard_normal((B, NH, S, DK)),
        "k": rng.standard_normal((B, NH, S, DK)),
        "v": rng.standard_normal((B, NH, S, DV)),
        "i": rng.uniform(*case.igate, (B, NH, S)),
        "f": rng.uniform(*case.fgate, (B, NH, S)),
    }
    if case.with_state:
        x["c_initial"] = rng.standard_normal((B, NH, DK, DV))
        x["n_initial"] = rng.standard_normal((B, NH, DK))
        x["m_initial"] = rng.uniform(-2.0, 2.0, (B, NH))
    w = {
        "h": rng.standard_normal((B, NH, S, DV)),
        "C": rng.standard_normal((B, NH, DK, DV)),
        "n": rng.standard_normal((B, NH, DK)),
        "m": rng.standard_normal((B, NH)),
    }
    x = {n: a.astype(jnp.dtype(dtype) if n in "qkv" else np.float32) for n, a in x.items()}
    return x, {n: a.astype(np.float32) for n, a in w.items()}


def _loss(h, states, w):
    c, n, m = states
    return jnp.sum(w["h"] * h) + jnp.sum(w["C"] * c) + jnp.sum(w["n"] * n) + jnp.sum(w["m"] * m)


def _outputs_and_grads(run, args, w):
    """(h, [C, n, m], {input: gradient}) as numpy, from one jitted value_and_grad of the weighted loss."""

    def loss(a):
        h, states = run(a)
        return _loss(h, states, w), (h, states)

    (_, (h, states)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return np.asarray(h), [np.asarray(s) for s in states], {n: np.asarray(g) for n, g in grads.items()}


@functools.lru_cache(maxsize=8)
def _reference(case: Case, seed: int, dtype: str):
    x, w = _inputs(case, seed, dtype)
    with jax.enable_x64(True):
        args = {n: jnp.asarray(np.asarray(a, np.float64)) for n, a in x.items()}
        w64 = {n: jnp.asarray(a, jnp.float64) for n, a in w.items()}
        return _outputs_and_grads(lambda a: mlstm_recurrent_reference(**a), args, w64)


def _backend(name, case: Case, seed: int, dtype: str):
    impl = api.IMPLEMENTATIONS[name]
    chunk_size = case.chunk_size if impl.chunk_sizes is not None else None
    x, w = _inputs(case, seed, dtype)

    def run(a):
        q, k, v, i, f = (a[n] for n in "qkvif")
        states = {n: a[n] for n in STATE_NAMES if n in a}
        h, last = api.mlstm(q, k, v, i, f, backend=name, chunk_size=chunk_size, return_last_states=True, **states)
        return h.astype(jnp.float32), last

    return _outputs_and_grads(run, {n: jnp.asarray(a) for n, a in x.items()}, w)


def rel_err(actual, expected) -> float:
    """||actual - expected|| / max(||expected||, 1e-6) in float64; inf when actual has NaN/inf."""
    actual = np.asarray(actual, np.float64)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-6))


def measure_errors(name: str, case: Case, *, dtype: str = "float32", seed: int = 0) -> dict[str, float]:
    """Relative errors of backend `name` vs the float64 reference on one case with q, k, v in `dtype`.

    Keys: "h", "C", "n", "m" and "d<input>" for every gradient (dq, dk, dv, di, df, dc_initial, ...).
    """
    rh, rstates, rgrads = _reference(case, seed, dtype)
    h, states, grads = _backend(name, case, seed, dtype)
    errors = {"h": rel_err(h, rh)}
    errors.update({s: rel_err(a, r) for s, a, r in zip("Cnm", states, rstates)})
    errors.update({f"d{n}": rel_err(g, rgrads[n]) for n, g in grads.items()})
    return errors


def check_backend(name: str, cases: tuple[Case, ...], seed: int = 0) -> Result:
    """Run `name` (float32) on every case and compare with the float64 reference."""
    result = Result(name, "PASS", 0.0, 0.0, 0.0)
    for index, case in enumerate(cases):
        _reference(case, seed + index, "float32")
    start = time.perf_counter()
    for index, case in enumerate(cases):
        try:
            errors = measure_errors(name, case, seed=seed + index)
        except Exception as exc:  # a backend that crashes is reported, not raised
            return Result(name, "FAIL", note=f"{type(exc).__name__}: {exc}"[:300])
        result.h_err = max(result.h_err, errors["h"])
        result.state_err = max(result.state_err, errors["C"], errors["n"], errors["m"])
        for key, err in errors.items():
            if key.startswith("d") and err >= result.grad_err:
                result.grad_err, result.worst_grad = err, key
    result.seconds = time.perf_counter() - start
    if not (result.h_err <= FW_TOL and result.state_err <= FW_TOL and result.grad_err <= BW_TOL):
        result.status = "FAIL"
        result.note = f"above tolerance (h, states <= {FW_TOL:.0e}; gradients <= {BW_TOL:.0e})"
    return result


def step_errors(backend: str, seed: int = 0) -> dict[str, float]:
    """Relative errors (`rel_err`) of h, C, n, m of two `mlstm_step` calls on `backend` (float32, B 2, NH 3, DHQK 40,
    DHHV 72: masked tiles; the second step from the first one's states, so C is read after the kernel wrote it)
    against the float64 recurrence over the same two tokens."""
    rng = np.random.default_rng(seed)
    B, NH, DHQK, DHHV = 2, 3, 40, 72

    def normal(*shape, scale=1.0, shift=0.0):
        return (rng.standard_normal(shape) * scale + shift).astype(np.float32)

    q, k = normal(B, NH, 2, DHQK), normal(B, NH, 2, DHQK)
    v, i, f = normal(B, NH, 2, DHHV), normal(B, NH, 2, scale=3.0), normal(B, NH, 2, scale=3.0, shift=2.0)
    state = (normal(B, NH, DHQK, DHHV), normal(B, NH, DHQK), normal(B, NH, scale=2.0))
    step = jax.jit(functools.partial(mlstm_step, backend=backend), donate_argnums=(5, 6, 7))
    hs, got = [], tuple(jnp.asarray(x) for x in state)
    for t in range(2):
        h, got = step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], *got)
        hs.append(h)
    with jax.enable_x64(True):
        want_h, want_state = mlstm_recurrent_reference(*(np.asarray(x, np.float64) for x in (q, k, v, i, f, *state)))
    got_all = (jnp.stack(hs, axis=2), *got)
    want_all = (want_h, *want_state)
    return {name: rel_err(a, b) for name, a, b in zip(("h", "C", "n", "m"), got_all, want_all)}


def _print_step_parity(console: Console) -> bool:
    """The decode step's table; True on a FAIL."""
    table = Table(title=f"Decode step (mlstm_step) vs float64 reference (h, states <= {FW_TOL:.0e})")
    for column in ("step backend", "h", "C", "n", "m", "result"):
        table.add_column(column)
    failed = False
    for backend in ("native", "triton"):
        ok = backend == "native" or triton_availability()[0]
        if not ok:
            table.add_row(backend, "-", "-", "-", "-", "SKIP")
            continue
        errors = step_errors(backend)
        bad = not all(e <= FW_TOL for e in errors.values())  # NaN fails too
        failed = failed or bad
        table.add_row(backend, *(_fmt(errors[n]) for n in ("h", "C", "n", "m")),
                      "[bold red]FAIL[/bold red]" if bad else "[green]PASS[/green]")
    console.print(table)
    return failed


def _versions_table(versions: dict[str, Any]) -> Table:
    table = Table(title="Versions", show_header=False)
    cc = versions["compute_capability"]
    tma = compat.tma_support(versions)
    rows = [
        ("python", versions["python"]),
        ("jax", versions["jax"]),
        ("jaxlib", versions["jaxlib"]),
        ("triton", versions["triton"]),
        ("jax-triton", versions["jax_triton"]),
        ("JAX platform", versions["platform"]),
        ("GPU", f"{versions['gpu']} (compute capability {cc[0]}.{cc[1]})" if versions["gpu"] else None),
        ("TMA descriptors", "{} ({})".format("available" if tma[0] else "no", tma[1])),
    ]
    for key, value in rows:
        table.add_row(key, str(value) if value is not None else "[dim]not installed / none[/dim]")
    return table


def _fmt(x: float) -> str:
    return "-" if np.isnan(x) else f"{x:.1e}"


def _chunk_text(impl: api.Implementation) -> str:
    if impl.chunk_sizes is None:
        return "-"
    return f"{impl.chunk_sizes[0]}..{impl.chunk_sizes[1]} (default {impl.default_chunk_size})"


def _print_problems(console: Console, problems: list[tuple[str, str]]) -> bool:
    """Print (severity, message) pairs; True when one is an error."""
    for severity, message in problems:
        style = "bold red" if severity == "error" else "yellow"
        console.print(f"[{style}]{severity}[/{style}]: {message}", highlight=False)
    return any(severity == "error" for severity, _ in problems)


def _print_versions(console: Console) -> bool:
    """Print the versions, known problems and self-defeating GPU memory settings; True when the combination is
    refused or a setting keeps JAX off the GPU."""
    versions = compat.installed_versions()
    console.print(_versions_table(versions))
    problems = compat.installed_problems(versions)
    refused = _print_problems(console, problems)
    if refused:
        console.print("[bold red]refused[/bold red]: the Triton kernels will not run with these versions.")
    elif not problems:
        console.print("no known version problems.")
    settings = compat.environment_problems(os.environ, compat.cuda_plugin_installed())
    return _print_problems(console, settings) or refused


def _print_backends(console: Console) -> dict[str, bool]:
    """Print every implementation with whether it can run here; return name -> runnable."""
    table = Table(title="Backends")
    for column in ("backend", "kind", "chunk sizes", "runnable", "why / where"):
        table.add_column(column)
    runnable = {}
    for name, impl in api.IMPLEMENTATIONS.items():
        ok, why = backend_availability(name)
        runnable[name] = ok
        kind = "Triton" if impl.needs_triton else "XLA"
        table.add_row(name, kind, _chunk_text(impl), "yes" if ok else "[red]no[/red]", why)
    console.print(table)
    return runnable


def run_doctor(backends: list[str] | None = None, quick: bool = False, console: Console | None = None) -> int:
    """Print the report; return 0, or 1 on a FAIL, a refused version combination or a requested backend that
    cannot run (a Triton backend that cannot run here is skipped unless requested)."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=140)
    failed = _print_versions(console)
    runnable = _print_backends(console)

    cases = QUICK_CASES if quick else FULL_CASES
    title = f"Parity vs float64 reference ({len(cases)} case(s); h, states <= {FW_TOL:.0e}, grads <= {BW_TOL:.0e})"
    parity = Table(title=title)
    for column in ("backend", "h", "states", "grads (worst)", "time", "result"):
        parity.add_column(column)
    for name in list(api.IMPLEMENTATIONS) if backends is None else backends:
        if not runnable[name]:
            if api.IMPLEMENTATIONS[name].needs_triton and backends is None:
                parity.add_row(name, "-", "-", "-", "-", "SKIP")
            else:
                failed = True
                parity.add_row(name, "-", "-", "-", "-", "[bold red]FAIL[/bold red] (cannot run)")
            continue
        res = check_backend(name, cases)
        failed = failed or res.status == "FAIL"
        mark = "[green]PASS[/green]" if res.status == "PASS" else f"[bold red]FAIL[/bold red] {res.note}"
        grads = f"{_fmt(res.grad_err)} {res.worst_grad}".strip()
        parity.add_row(name, _fmt(res.h_err), _fmt(res.state_err), grads, f"{res.seconds:.1f}s", mark)
    console.print(parity)
    failed = _print_step_parity(console) or failed
    console.print("[bold red]doctor: FAIL[/bold red]" if failed else "[green]doctor: OK[/green]")
    return int(failed)
