"""`xlstm-jax bench`: the smoke sweep on CPU, the cost model against its worked example (docs/benchmarks.md), the
presets, and isolation (a crashing, raising or hanging peer is reported without stopping the sweep)."""

import csv
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax
import pytest

from xlstm_jax import cli
from xlstm_jax.bench import cost, measure, runner
from xlstm_jax.bench.cases import PRESETS
from xlstm_jax.bench.peers import PEERS, Peer
from xlstm_jax.bench.worker import Worker, run_isolated
from xlstm_jax.mlstm import IMPLEMENTATIONS

NATIVE = ("native_parallel", "native_recurrent", "native_chunkwise")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the smoke preset's native-only rows are a CPU's")
def test_smoke_preset_on_cpu_writes_csv_json_png(tmp_path, capsys):
    assert cli.main(["bench", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "xlstm-jax bench: smoke" in text and "Not measured" in text

    rows = _csv_rows(tmp_path / "results.csv")
    measured = {(r["impl"], r["mode"], int(r["S"])): r for r in rows if r["source"] == "xlstm_jax" and r["mode"]}
    assert set(measured) == {(n, m, S) for n in NATIVE for m in ("fw", "fwbw") for S in (32, 64)}
    for r in measured.values():
        assert r["status"] == "ok", r
        assert int(r["reps"]) >= 10 and int(r["calls_per_run"]) >= 1
        assert 0 < float(r["ms_min"]) <= float(r["ms_median"]) <= float(r["ms_max"])
        assert float(r["xla_mb"]) > 0 and float(r["flops"]) > 0 and float(r["bytes"]) > 0
        assert r["frac_peak"] == "" and r["roofline_frac"] == ""  # a CPU has no known peak
    chunk = measured[("native_chunkwise", "fwbw", 64)]
    expected = cost.mlstm_cost(1, 2, 64, 16, 32, 64, 4, "fwbw")
    assert float(chunk["flops"]) == pytest.approx(expected.flops)
    assert float(chunk["bytes"]) == pytest.approx(expected.bytes)
    recurrent = measured[("native_recurrent", "fw", 32)]
    assert float(recurrent["flops"]) == pytest.approx(cost.mlstm_fw_flops(1, 2, 32, 16, 32, 1))

    absent = {r["impl"]: r for r in rows if r["status"] in ("not installed", "not run")}
    assert set(PEERS) - {"mk_jax_native_step", "mk_jax_triton_step"} <= set(absent)
    for name in ("triton_limit_chunk", "triton_xl_chunk"):
        assert name in absent and name not in {k[0] for k in measured}

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["preset"] == "smoke" and data["meta"]["device_peak"] is None
    fingerprint = runner.kernels_fingerprint()
    assert data["meta"]["kernels"] == fingerprint and len(fingerprint) == 12
    assert all(r["kernels"] == fingerprint and r["measured"] for r in measured.values())
    assert len(data["rows"]) == len(rows)
    for name in ("runtime.png", "roofline.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "L, fw_flops, fw_bytes, bw_flops, bw_bytes",
    [
        (64, (1.66e11, 1.92e11), 6.75e9, (4.21e11, 4.98e11), 18.3e9),
        (128, (1.92e11, 2.44e11), 4.60e9, (4.98e11, 6.53e11), 13.0e9),
        (256, (2.44e11, 3.48e11), 3.52e9, (6.53e11, 9.62e11), 10.3e9),
    ],
)
def test_cost_model_matches_the_worked_example(L, fw_flops, fw_bytes, bw_flops, bw_bytes):
    """docs/benchmarks.md, "Cost model": B=8, S=8192, NH=16, DHQK=128, DHHV=256, bf16 q/k/v/h (3-digit values)."""
    shape = (8, 16, 8192, 128, 256, L)
    rel = 6e-3
    assert cost.mlstm_fw_flops(*shape, F_c=0.5) == pytest.approx(fw_flops[0], rel=rel)
    assert cost.mlstm_fw_flops(*shape, F_c=1.0) == pytest.approx(fw_flops[1], rel=rel)
    assert cost.mlstm_fw_bytes(*shape, qkv_bytes=2) == pytest.approx(fw_bytes, rel=rel)
    assert cost.mlstm_bw_flops(*shape, F_c=0.5) == pytest.approx(bw_flops[0], rel=rel)
    assert cost.mlstm_bw_flops(*shape, F_c=1.0) == pytest.approx(bw_flops[1], rel=rel)
    assert cost.mlstm_bw_bytes(*shape, qkv_bytes=2) == pytest.approx(bw_bytes, rel=rel)
    fwbw = cost.mlstm_cost(*shape, 2, "fwbw")
    assert fwbw.flops == pytest.approx(fw_flops[0] + bw_flops[0], rel=rel)
    assert fwbw.bytes == pytest.approx(fw_bytes + bw_bytes, rel=rel)


def test_short_calls_are_repeated_within_a_timed_run():
    assert measure.calls_per_run(0.5) == 1 and measure.calls_per_run(measure.MIN_RUN_S) == 2
    assert measure.calls_per_run(1e-4) == 21 and measure.calls_per_run(1e-7) == measure.MAX_CALLS_PER_RUN
    calls = []
    seconds, inner = measure.timed_runs(lambda: calls.append(1) or time.sleep(5e-4), lambda out: out, reps=10)
    assert len(seconds) == 10 and inner > 1
    assert len(calls) == measure.WARMUP + 10 * inner
    assert all(5e-4 <= s < 5e-2 for s in seconds)
    calls.clear()  # a fixed count (steps a loop dispatches before it waits) overrides the probe
    seconds, inner = measure.timed_runs(lambda: calls.append(1) or time.sleep(5e-4), lambda out: out, reps=4, calls=3)
    assert inner == 3 and len(seconds) == 4 and len(calls) == measure.WARMUP + 4 * 3


def test_roofline_fractions_and_device_table():
    h100 = cost.device_peak("NVIDIA H100 80GB HBM3")
    assert (h100.bf16_flops, h100.hbm_bytes) == (989e12, 3.35e12)
    assert cost.device_peak("NVIDIA H100 PCIe").bf16_flops == 756e12
    assert cost.device_peak("NVIDIA H200").hbm_bytes == 4.8e12
    assert cost.device_peak("NVIDIA A100-SXM4-80GB").bf16_flops == 312e12
    assert cost.device_peak("NVIDIA GH200 480GB") is None and cost.device_peak("cpu") is None
    # worked example, L=64: the forward is memory bound; at t = bytes / bandwidth (2.02 ms) it sits on the roofline
    fw = cost.mlstm_cost(8, 16, 8192, 128, 256, 64, 2, "fw")
    t_mem = fw.bytes / h100.hbm_bytes
    assert t_mem * 1e3 == pytest.approx(2.02, abs=0.005)
    assert fw.flops / fw.bytes == pytest.approx(25, abs=0.5)
    at_bound = cost.roofline(fw, t_mem, h100)
    assert at_bound["roofline_frac"] == pytest.approx(1.0) and at_bound["frac_bw"] == pytest.approx(1.0)
    assert at_bound["frac_peak"] == pytest.approx(fw.flops / t_mem / 989e12)
    slower = cost.roofline(fw, 4 * t_mem, h100)
    assert slower["roofline_frac"] == pytest.approx(0.25) and slower["tbs"] == pytest.approx(3.35 / 4)
    assert cost.roofline(fw, t_mem, None)["roofline_frac"] is None


def test_presets_and_the_memory_guard(monkeypatch):
    tfla = PRESETS["tfla-const-tokens"].shapes
    assert [s.S for s in tfla] == [512 * 2**p for p in range(8)]
    assert all(s.B * s.S == 65536 and (s.NH, s.DHQK, s.DHHV) == (16, 128, 256) for s in tfla)
    assert [(s.S, s.NH, s.DHQK, s.DHHV) for s in PRESETS["7b"].shapes] == [
        (S, 8, 256, 512) for S in (2048, 4096, 8192, 16384, 32768)]
    assert [(s.NH * s.DHHV, s.DHHV) for s in PRESETS["head-dims"].shapes] == [
        (4096, dh) for dh in (64, 128, 256, 512, 1024)]

    args = cli.build_parser().parse_args(["bench", "--preset", "tfla-const-tokens"])
    monkeypatch.setattr(runner, "_device_limit", lambda: 80 * 2**30)
    cases, _ = runner.build_cases(PRESETS["tfla-const-tokens"], ["native_parallel", "native_chunkwise"],
                                  {"cudnn_attention": PEERS["cudnn_attention"]}, args, "bfloat16")
    skipped = {(c.impl, c.shape.S, c.mode) for c in cases if c.skip}
    assert ("native_parallel", 65536, "fw") in skipped and ("native_parallel", 512, "fwbw") not in skipped
    assert not any(impl != "native_parallel" for impl, _, _ in skipped)
    attention = [c for c in cases if c.impl == "cudnn_attention"]
    assert all(c.run_shape == (c.shape.B, 32, c.shape.S, 128, 128) and c.isolate for c in attention)


@pytest.mark.slow
def test_decode_preset_cases_and_one_tiny_step():
    args = cli.build_parser().parse_args(["bench", "--preset", "decode", "--mode", "both", "--reps", "10"])
    cases, _ = runner.build_cases(PRESETS["decode"], [], {}, args, "bfloat16")
    assert [c.run_shape for c in cases] == [(2**p, 8, 1, 256, 512) for p in range(9) for _ in range(2)]
    assert {c.mode for c in cases} == {"fw"} and {c.impl for c in cases} == {runner.DECODE_IMPL, "mlstm_step"}
    for case in cases[:2]:  # the seed step and mlstm_step (called in the seed step's argument order)
        tiny = dataclasses.replace(case, run_shape=(2, 2, 1, 16, 32))
        row = runner.measure_case(tiny, timeout=60)
        assert row["status"] == "ok", row
        assert row["ms_median"] > 0
        assert row["bytes"] == pytest.approx(cost.decode_step_cost(2, 2, 16, 32, 2).bytes)


CRASH_MODULE = """
import os, time

def abort(spec):
    os.abort()

def raise_error(spec):
    raise RuntimeError("peer exploded")

def hang(spec):
    time.sleep(600)

def pid(spec):
    print("a line that is not a result", flush=True)
    return {"pid": os.getpid()}
"""


@pytest.fixture
def crash_module(tmp_path, monkeypatch):
    (tmp_path / "bench_crash_peer.py").write_text(CRASH_MODULE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    return "bench_crash_peer"


@pytest.mark.slow
def test_crashing_peers_are_reported_failed_and_the_sweep_goes_on(crash_module, tmp_path, monkeypatch):
    for name, fn in (("aborter", "abort"), ("raiser", "raise_error")):
        monkeypatch.setitem(PEERS, name, Peer("sequence", f"{crash_module}:{fn}", "mlstm", name, needs_gpu=False))
    out = tmp_path / "out"
    argv = ["bench", "--shape", "1,2,32,16,32", "--dtype", "float32", "--backends", "native_chunkwise", "--mode", "fw",
            "--peers", "aborter,raiser", "--timeout", "120", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = {r["impl"]: r for r in _csv_rows(out / "results.csv")}
    assert rows["native_chunkwise"]["status"] == "ok"
    assert rows["aborter"]["status"] == "failed" and "SIGABRT" in rows["aborter"]["note"]
    assert rows["raiser"]["status"] == "failed" and "RuntimeError: peer exploded" in rows["raiser"]["note"]
    assert (out / "runtime.png").exists()


@pytest.mark.slow
def test_a_peer_that_keeps_crashing_is_skipped_after_the_limit(crash_module, tmp_path, monkeypatch):
    monkeypatch.setitem(PEERS, "aborter", Peer("sequence", f"{crash_module}:abort", "mlstm", "a", needs_gpu=False))
    argv = ["bench", "--shape", "1,2,32,16,32", "--shape", "1,2,64,16,32", "--shape", "1,2,128,16,32",
            "--dtype", "float32", "--backends", "native_chunkwise", "--mode", "fw", "--peers", "aborter",
            "--timeout", "120", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = [r for r in _csv_rows(tmp_path / "results.csv") if r["impl"] == "aborter"]
    assert [r["status"] for r in rows] == ["failed"] * runner.PEER_CRASH_LIMIT + ["skipped"]
    assert "crashed in 2 earlier cases" in rows[-1]["note"] and "SIGABRT" in rows[-1]["note"]
    # a resumed sweep keeps the failed and skipped cases instead of crashing the peer again
    measured = []
    monkeypatch.setattr(runner, "measure_case", lambda case, *rest: measured.append(case.impl))
    assert cli.main(argv + ["--resume"]) == 0
    assert measured == []
    resumed = [r for r in _csv_rows(tmp_path / "results.csv") if r["impl"] == "aborter"]
    assert [r["status"] for r in resumed] == [r["status"] for r in rows]


@pytest.mark.slow
def test_resume_runs_only_the_cases_not_measured_yet(tmp_path, monkeypatch):
    base = ["bench", "--shape", "1,2,32,16,32", "--dtype", "float32", "--mode", "fw", "--no-peers",
            "--out", str(tmp_path)]
    assert cli.main(base + ["--backends", "native_chunkwise"]) == 0
    first = {r["impl"]: r for r in _csv_rows(tmp_path / "results.csv")}
    measure, measured = runner.measure_case, []

    def record(case, *rest):
        measured.append(case.impl)
        return measure(case, *rest)

    monkeypatch.setattr(runner, "measure_case", record)
    assert cli.main(base + ["--backends", "native_chunkwise,native_recurrent", "--resume"]) == 0
    assert measured == ["native_recurrent"]
    rows = {r["impl"]: r for r in _csv_rows(tmp_path / "results.csv")}
    assert rows["native_chunkwise"]["ms_median"] == first["native_chunkwise"]["ms_median"]
    assert rows["native_recurrent"]["status"] == "ok"
    assert "1 cases kept" in json.loads((tmp_path / "results.json").read_text())["meta"]["resumed"]


@pytest.mark.slow
def test_a_hanging_case_times_out(crash_module):
    result = run_isolated({"target": f"{crash_module}:hang"}, timeout=3)
    assert result == {"status": "timeout", "note": "killed after 3 s"}


@pytest.mark.slow
def test_one_worker_serves_many_cases_and_is_replaced_after_a_crash_or_hang(crash_module):
    with Worker() as worker:
        first, second = (worker.measure({"target": f"{crash_module}:pid"}, timeout=60) for _ in range(2))
        assert first["status"] == second["status"] == "ok" and first["pid"] == second["pid"]
        assert worker.measure({"target": f"{crash_module}:raise_error"}, timeout=60)["status"] == "failed"
        assert worker.measure({"target": f"{crash_module}:pid"}, timeout=60)["pid"] == first["pid"]
        crashed = worker.measure({"target": f"{crash_module}:abort"}, timeout=60)
        assert crashed["status"] == "failed" and "SIGABRT" in crashed["note"]
        assert worker.crashes == [crashed["note"]]
        after_crash = worker.measure({"target": f"{crash_module}:pid"}, timeout=60)
        assert after_crash["status"] == "ok" and after_crash["pid"] != first["pid"]
        assert worker.measure({"target": f"{crash_module}:hang"}, timeout=3)["status"] == "timeout"
        after_hang = worker.measure({"target": f"{crash_module}:pid"}, timeout=60)
        assert after_hang["status"] == "ok" and after_hang["pid"] not in (first["pid"], after_crash["pid"])


def _broken_backend(*args, **kwargs):
    raise RuntimeError("kernel exploded")


@pytest.mark.slow
def test_a_failing_backend_is_reported_and_sets_the_exit_status(tmp_path, monkeypatch):
    monkeypatch.setitem(IMPLEMENTATIONS, "native_recurrent",
                        dataclasses.replace(IMPLEMENTATIONS["native_recurrent"], run=_broken_backend))
    argv = ["bench", "--shape", "1,2,32,16,32", "--dtype", "float32", "--backends",
            "native_recurrent,native_chunkwise", "--mode", "fw", "--no-peers", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    rows = {r["impl"]: r for r in _csv_rows(tmp_path / "results.csv")}
    assert rows["native_chunkwise"]["status"] == "ok"
    assert rows["native_recurrent"]["status"] == "failed" and "kernel exploded" in rows["native_recurrent"]["note"]


@pytest.mark.slow
def test_a_sweep_stopped_early_keeps_the_cases_it_measured(tmp_path, monkeypatch):
    measure = runner.measure_case
    calls = []

    def stop_at_the_second_case(case, timeout, *rest):  # stands in for the time limit of a GPU session
        calls.append(case)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(case, timeout, *rest)

    monkeypatch.setattr(runner, "measure_case", stop_at_the_second_case)
    argv = ["bench", "--shape", "1,2,32,16,32", "--dtype", "float32", "--backends", "native_chunkwise",
            "--mode", "both", "--no-peers", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    rows = [r for r in _csv_rows(tmp_path / "results.csv") if r["status"] == "ok"]
    assert [(r["impl"], r["mode"]) for r in rows] == [("native_chunkwise", "fw")]
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["status"] == "ok"


def test_fewer_than_ten_reps_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--reps", "5"])
    assert info.value.code == 2
    assert "--reps must be an integer >= 10" in capsys.readouterr().err


def test_plot_series_name_each_chunk_size_once():
    from xlstm_jax.bench.report import _series

    row = dict(status="ok", mode="fw", x=64, ms_median=1.0, source="xlstm_jax")
    rows = [dict(row, impl="triton_xl_chunk L=64", chunk=64), dict(row, impl="triton_limit_chunk", chunk=64),
            dict(row, impl="cudnn_attention", chunk=None)]
    assert set(_series(rows, "fw", "ms_median")) == {"triton_xl_chunk L=64", "triton_limit_chunk L=64",
                                                     "cudnn_attention"}


def test_the_kernels_fingerprint_follows_kernel_code_and_launch_table(tmp_path):
    kernels = Path(runner.__file__).resolve().parents[1] / "kernels"
    same, changed = tmp_path / "same", tmp_path / "changed"
    for copy in (same, changed):
        shutil.copytree(kernels, copy, ignore=shutil.ignore_patterns("__pycache__"))
    table = next(changed.rglob("launch_table.json"))
    table.write_text(table.read_text().replace('"bw_warps": 4', '"bw_warps": 8', 1))
    assert runner.kernels_fingerprint(same) == runner.kernels_fingerprint()
    assert runner.kernels_fingerprint(changed) != runner.kernels_fingerprint()


def test_markdown_tables_pivot_the_ok_rows_and_list_what_failed(tmp_path, capsys):
    from xlstm_jax.bench import report

    row = dict(status="ok", source="xlstm_jax", chunk=64, impl="triton_limit_chunk", roofline_frac=0.5)
    rows = [dict(row, mode="fw", x=512, ms_median=1.234), dict(row, mode="fwbw", x=512, ms_median=5.0),
            dict(row, mode="fw", x=1024, ms_median=2.0),
            dict(status="failed", source="peer", chunk=128, impl="mk_jax_xl_chunk", mode="fw", x=512,
                 note="crashed (signal SIGABRT)")]
    meta = {"preset": "custom", "dtype": "bfloat16", "device_kind": "cpu", "x_name": "S", "device_peak": None}
    text = report.markdown_tables(rows, meta)
    assert "| implementation | S=512 | S=1024 |" in text
    assert "| triton_limit_chunk L=64 | 1.23 / 5.00 | 2.00 / - |" in text
    assert "| triton_limit_chunk L=64 | 50% / 50% | 50% / - |" in text
    assert "`mk_jax_xl_chunk` failed: crashed (signal SIGABRT)" in text
    assert "other kernel code" not in text  # rows without fingerprints (older files) are not flagged

    fresh = dict(row, impl="triton_xl_chunk", mode="fw", x=512, ms_median=1.0, kernels="new")
    text = report.markdown_tables([*(dict(r, kernels="old") for r in rows[:3]), fresh], {**meta, "kernels": "new"})
    assert "than the run's last call (kernels new): triton_limit_chunk L=64\n" in text
    report.write_json(rows, meta, tmp_path / "results.json")
    assert report.main([str(tmp_path)]) == 0
    assert "#### custom" in capsys.readouterr().out
    assert (tmp_path / "runtime.png").read_bytes().startswith(PNG_MAGIC)
