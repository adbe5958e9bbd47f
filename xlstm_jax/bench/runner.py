"""`xlstm-jax bench`: build the cases of a preset, measure them with a progress bar, write the report.

xlstm_jax's own cases run first, in this process (or each in a fresh subprocess with --isolate, which also gives
exact per-case peak memory); then each peer's cases run in one long-lived subprocess per peer, with a timeout per
case, restarted after a crash (`xlstm_jax.bench.worker`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from xlstm_jax.bench import cost as cost_model
from xlstm_jax.bench.cases import (
    ATTENTION_DH,
    ATTENTION_NH,
    PRESETS,
    Case,
    Preset,
    custom_preset,
    parse_shape,
    working_set_bytes,
)
from xlstm_jax.bench.measure import MIN_REPS, load
from xlstm_jax.bench.peers import PEERS, Peer, peer_availability
from xlstm_jax.bench.worker import Worker, run_isolated

DECODE_IMPL = "recurrent_step_fw"
PEER_CRASH_LIMIT = 2  # after this many crashed cases (e.g. a compiler abort) a peer's other cases are skipped
_KEY = ("impl", "source", "mode", "dtype", "B", "NH", "S", "DHQK", "DHHV", "chunk")
MEASURE = "xlstm_jax.bench.measure"


@functools.cache
def kernels_fingerprint(root: Path = Path(__file__).resolve().parents[1] / "kernels") -> str:
    """12 hex digits of a SHA-256 over xlstm_jax's kernel sources and launch table (xlstm_jax/kernels/**/*.py,
    *.json): rows measured by different kernel code or launch parameters carry different fingerprints, so a
    resumed sweep shows which of its rows predate a change."""
    digest = hashlib.sha256()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.json")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _shape_arg(text: str) -> tuple[int, int, int, int, int]:
    try:
        return parse_shape(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _reps(text: str) -> int:
    if not text.isdigit() or int(text) < MIN_REPS:
        raise argparse.ArgumentTypeError(f"--reps must be an integer >= {MIN_REPS}, got {text!r}")
    return int(text)


def name_list(text: str, known, what: str) -> list[str]:
    """A comma-separated option value as names, each one of `known` (argparse's error otherwise)."""
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {unknown}; choose from {list(known)}")
    return names


def _peer_list(text: str) -> list[str]:
    return name_list(text, PEERS, "peer")


def add_arguments(parser: argparse.ArgumentParser, backend_type: Callable[[str], list[str]]) -> None:
    """The options of `xlstm-jax bench`; `backend_type` parses one --backends word into backend names."""
    parser.add_argument("--preset", choices=list(PRESETS), default="smoke",
                        help="problem sizes: " + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()))
    parser.add_argument("--shape", action="append", type=_shape_arg, metavar="B,NH,S,DHQK,DHHV",
                        help="explicit shape (repeatable); replaces the preset's shapes")
    parser.add_argument("--backends", nargs="+", type=backend_type, metavar="NAME",
                        help="xlstm_jax backends (space- or comma-separated); default: all that run here, "
                        "Triton ones only on a GPU (the CPU interpreter's timings mean nothing)")
    parser.add_argument("--mode", choices=("fw", "fwbw", "both"), default="both",
                        help="forward, forward+backward, or both (decode: forward only)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="q/k/v dtype; default: the preset's (bfloat16; smoke: float32), bfloat16 with --shape")
    parser.add_argument("--chunk-sizes", type=_int_list, metavar="L,L,...",
                        help="chunk sizes for the chunked implementations (each within its range); default: each "
                        "implementation's default")
    parser.add_argument("--reps", type=_reps, default=20, help=f"timed runs per case (>= {MIN_REPS}; default 20)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder (default out/bench)")
    parser.add_argument("--peers", nargs="+", type=_peer_list, metavar="NAME",
                        help=f"peers to include (default: all of {list(PEERS)})")
    parser.add_argument("--no-peers", action="store_true", help="leave the peers out")
    parser.add_argument("--isolate", action="store_true",
                        help="run xlstm_jax's cases in subprocesses too (crash-safe, exact peak memory per case)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess case (default 900)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cases already measured in OUT/results.json (ok, failed or timed out) and run "
                        "only the others: continues a sweep cut by a time limit")


def default_backends() -> tuple[list[str], dict[str, str]]:
    """(backends to run, {backend: why not}) — every runnable one; Triton ones not through the interpreter."""
    from xlstm_jax.doctor import backend_availability
    from xlstm_jax.kernels.launch import interpret_mode
    from xlstm_jax.mlstm.api import IMPLEMENTATIONS

    run, why_not = [], {}
    for name, impl in IMPLEMENTATIONS.items():
        ok, why = backend_availability(name)
        if ok and impl.needs_triton and interpret_mode():
            why_not[name] = "Triton interpreter: timings are meaningless (name it in --backends to run anyway)"
        elif ok:
            run.append(name)
        else:
            why_not[name] = why
    return run, why_not


def _chunks(default: int | None, allowed: tuple[int, int] | None, requested: list[int] | None) -> list[int | None]:
    if allowed is None:
        return [None]
    if requested is None:
        return [default]
    return [c for c in requested if allowed[0] <= c <= allowed[1]]


def _device_limit() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("bytes_limit")


def build_cases(preset: Preset, backends: list[str], peers: dict[str, Peer], args: argparse.Namespace,
                dtype: str) -> tuple[list[Case], list[dict[str, Any]]]:
    """The cases to measure, and a row for every implementation that is not run at all (with the reason)."""
    from xlstm_jax.mlstm.api import IMPLEMENTATIONS

    modes = ["fw"] if preset.kind == "decode" or args.mode == "fw" else \
        ["fwbw"] if args.mode == "fwbw" else ["fw", "fwbw"]
    size, limit = jnp.dtype(dtype).itemsize, _device_limit()
    cases: list[Case] = []
    not_run: dict[str, dict[str, Any]] = {}

    def add(template: Case, default: int | None, allowed: tuple[int, int] | None) -> None:
        """One case per chunk size and mode; `template` holds everything else."""
        chunks = _chunks(default, allowed, args.chunk_sizes)
        if not chunks:
            not_run[template.impl] = {"impl": template.impl, "source": template.source, "status": "not run",
                                      "note": f"no requested chunk size within {allowed}"}
        for chunk in chunks:
            for mode in modes:
                need = working_set_bytes(template.options.get("backend", ""), template.run_shape, mode, size)
                skip = None if limit is None or need < 0.9 * limit else \
                    f"needs >= {need / 2**30:.0f} GiB, device has {limit / 2**30:.0f} GiB"
                cases.append(dataclasses.replace(
                    template, impl=template.impl if len(chunks) == 1 else f"{template.impl} L={chunk}",
                    mode=mode, chunk=chunk, model_chunk=chunk or template.model_chunk, skip=skip))

    for shape in preset.shapes:
        dims = (shape.B, shape.NH, shape.S, shape.DHQK, shape.DHHV)
        if preset.kind == "decode":
            for impl, options in ((DECODE_IMPL, {}), ("mlstm_step", {"fn": f"{MEASURE}:seed_order_mlstm_step"})):
                add(Case(impl, "xlstm_jax", f"{MEASURE}:measure_decode", "decode", shape, dims, dtype, "fw",
                         None, 1, args.reps, options, args.isolate), None, None)
        for name in backends if preset.kind == "sequence" else []:
            impl = IMPLEMENTATIONS[name]
            # cost-model chunk of the chunkless backends: the whole sequence (parallel), one step (recurrent)
            model_chunk = shape.S if name == "native_parallel" else 1
            add(Case(name, "xlstm_jax", f"{MEASURE}:measure_mlstm", "mlstm", shape, dims, dtype, "fw", None,
                     model_chunk, args.reps, {"backend": name}, args.isolate),
                impl.default_chunk_size, impl.chunk_sizes)
        for name, peer in peers.items():
            run_shape = (shape.B, ATTENTION_NH, shape.S, ATTENTION_DH, ATTENTION_DH) \
                if peer.model == "attention" else dims
            options = {} if peer.fn is None else {"fn": peer.fn}
            add(Case(name, "peer", peer.target, peer.model, shape, run_shape, dtype, "fw", None, 1, args.reps,
                     options, True, peer=name), peer.chunk, peer.chunk_range)
    # xlstm_jax's cases first, then each peer's together (one worker process per peer)
    cases.sort(key=lambda c: (c.source == "peer", list(peers).index(c.peer) if c.source == "peer" else 0))
    return cases, list(not_run.values())


def _select_peers(preset: Preset, args: argparse.Namespace, dtype: str) -> tuple[dict[str, Peer], list[dict]]:
    if args.no_peers:
        return {}, []
    names = list(dict.fromkeys(n for group in args.peers for n in group)) if args.peers else list(PEERS)
    run, rows = {}, []
    for name in names:
        peer = PEERS[name]
        if peer.kind != preset.kind:
            continue
        ok, why = peer_availability(peer)
        if ok and peer.dtypes is not None and dtype not in peer.dtypes:
            ok, why = False, f"takes {'/'.join(peer.dtypes)} inputs, not {dtype}"
        if ok:
            run[name] = peer
        else:
            prefix = "not installed: "
            status, note = ("not installed", why[len(prefix):]) if why.startswith(prefix) else ("not run", why)
            rows.append({"impl": name, "source": "peer", "status": status, "note": note})
    return run, rows


class PeerWorkers:
    """One live worker subprocess, for the peer whose cases run now (the previous peer's is closed); a peer whose
    cases crashed PEER_CRASH_LIMIT times gets its other cases skipped."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._worker: Worker | None = None

    def measure(self, name: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """`Worker.measure` in peer `name`'s worker, or a "skipped" result past the crash limit."""
        if name != self._name:
            self.close()
            self._name, self._worker = name, Worker()
        crashes = self._worker.crashes
        if len(crashes) >= PEER_CRASH_LIMIT:
            return {"status": "skipped", "note": f"not run: crashed in {len(crashes)} earlier cases "
                    f"({crashes[-1][:120]})"}
        return self._worker.measure(spec, timeout)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
        self._name = self._worker = None


def measure_case(case: Case, timeout: float, workers: PeerWorkers | None = None) -> dict[str, Any]:
    """The result row of one case: its identity, status, timings and the cost model's rates. Peer cases run in
    `workers`' subprocess for their peer (a fresh one when `workers` is None), --isolate cases in a fresh one."""
    row = case.row()
    if case.skip:
        return {**row, "status": "skipped", "note": case.skip}
    if case.source == "peer" and workers is not None:
        result = workers.measure(case.peer, case.spec(), timeout)
        if result["status"] == "skipped":
            return {**row, **result}
    elif case.isolate:
        result = run_isolated(case.spec(), timeout)
    else:
        try:
            result = {"status": "ok", **load(case.target)(case.spec())}
        except Exception as exc:  # a failing backend must not stop the sweep
            result = {"status": "failed", "note": f"{type(exc).__name__}: {exc}"[:300]}
    row.update(result, measured=datetime.datetime.now().isoformat(timespec="seconds"))
    if case.source == "xlstm_jax":
        row["kernels"] = kernels_fingerprint()
    cost = case.cost()
    row.update(flops=cost.flops, bytes=cost.bytes)
    if row["status"] == "ok":
        peak = cost_model.device_peak(jax.devices()[0].device_kind)
        row.update(cost_model.roofline(cost, row["ms_median"] / 1e3, peak))
    return row


def _previous_rows(path: Path) -> tuple[dict[tuple, dict[str, Any]], str | None]:
    """The decided rows of an earlier run's results.json by case identity (measured, failed, timed out, or skipped:
    past a peer's crash limit, so a resumed sweep does not crash that peer again, or too large for the device's
    memory), and that run's time."""
    if not path.exists():
        return {}, None
    data = json.loads(path.read_text())
    kept = ("ok", "failed", "timeout", "skipped")
    done = {tuple(r.get(k) for k in _KEY): r for r in data["rows"] if r.get("status") in kept}
    return done, data.get("meta", {}).get("time")


def run_bench(args: argparse.Namespace) -> int:
    """Run the sweep described by parsed `xlstm-jax bench` arguments; 0, or 1 if an xlstm_jax case failed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from xlstm_jax.bench import report

    console = Console() if sys.stdout.isatty() else Console(width=160)
    preset = PRESETS[args.preset]
    dtype = args.dtype or ("bfloat16" if args.shape else preset.dtype)
    if args.shape:
        preset = custom_preset(args.shape, dtype)
    if args.backends is not None:
        backends, why_not = list(dict.fromkeys(n for group in args.backends for n in group)), {}
    else:
        backends, why_not = default_backends()
    peers, rows = _select_peers(preset, args, dtype)
    rows += [{"impl": n, "source": "xlstm_jax", "status": "not run", "note": why} for n, why in why_not.items()
             if preset.kind == "sequence"]
    cases, not_run = build_cases(preset, backends, peers, args, dtype)
    rows += not_run
    device = jax.devices()[0]
    peak = cost_model.device_peak(device.device_kind)
    meta = {
        "preset": preset.name, "description": preset.description, "x_name": preset.x_name, "dtype": dtype,
        "device_kind": device.device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
        "device_peak": None if peak is None else vars(peak), "command": ["xlstm-jax", *sys.argv[1:]],
        "time": datetime.datetime.now().isoformat(timespec="seconds"), "kernels": kernels_fingerprint(),
        "memory_note": "peak_mb: device.memory_stats() peak; JAX cannot reset it, so in-process cases report an "
        "upper bound unless the peak rose during the case (peak_exact); subprocess cases are exact.",
    }
    measured = []
    args.out.mkdir(parents=True, exist_ok=True)
    previous, previous_time = _previous_rows(args.out / "results.json") if args.resume else ({}, None)
    if previous_time:
        meta["resumed"] = f"continues the run of {previous_time}; {len(previous)} cases kept from it"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    workers = PeerWorkers()
    with Progress(*columns, console=console, transient=True) as progress, contextlib.closing(workers):
        task = progress.add_task("bench", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.impl} {case.mode} {case.run_shape}")
            row = previous.get(tuple(case.row()[k] for k in _KEY))
            measured.append(row or measure_case(case, args.timeout, workers))
            progress.advance(task)
            # the files grow case by case: a sweep stopped early (a time limit) keeps what it measured
            report.write_csv(measured + rows, args.out / "results.csv")
            report.write_json(measured + rows, meta, args.out / "results.json")
    rows = measured + rows
    report.print_table(rows, meta, console)
    report.write_csv(rows, args.out / "results.csv")
    report.write_json(rows, meta, args.out / "results.json")
    plots = report.write_plots(rows, meta, args.out)
    console.print(f"wrote {args.out / 'results.csv'}, {args.out / 'results.json'}, "
                  f"{', '.join(str(p) for p in plots)}")
    failed = [r for r in measured if r["source"] == "xlstm_jax" and r["status"] in ("failed", "timeout")]
    return 1 if failed else 0
