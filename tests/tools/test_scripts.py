"""The GPU-side scripts run end to end at tiny sizes (Triton interpreter on CPU): the launch tuner keeps only
candidates whose gradients agree with the checked-in configuration, the stage profiler times every stage, and the
throughput script reports every backend."""

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from tests.support.devices import ROOT, run_on_devices
from xlstm_jax.kernels.triton import launch_table

SCRIPTS = Path(ROOT) / "scripts"  # the repository's scripts/


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tuner_rejects_a_candidate_with_wrong_gradients(tmp_path, capsys, monkeypatch):
    tuner = _load("tune_launch")
    right = tuner._fw

    def fw_broken_with_4_warps(family, chunk, xl_args, launch):  # stands in for a miscompiled kernel
        fw = right(family, chunk, xl_args, launch)
        scale = 2.0 if launch["recurrent.warps"] == 4 else 1.0
        return lambda *a: fw(*a) * jnp.asarray(scale, a[0].dtype)

    monkeypatch.setattr(tuner, "_fw", fw_broken_with_4_warps)
    out = tmp_path / "tune.json"
    table = tmp_path / "table.json"
    table.write_text(launch_table.TABLE_PATH.read_text())
    tuner.main(["--shape", "1,1,32,16,16", "--dtype", "float32", "--runs", "limit:16", "--knobs", "recurrent.warps",
                "--reps", "10", "--out", str(out), "--write-table", "--table", str(table)])
    wrong = [line for line in capsys.readouterr().out.splitlines() if "WRONG" in line]
    assert len(wrong) == 1 and "recurrent.warps=4" in wrong[0]
    (result,) = json.loads(out.read_text())["results"]
    assert result["setting"]["recurrent.warps"] in (1, 2) and result["fw_ms"] > 0 and result["fwbw_ms"] > 0
    written = json.loads(table.read_text())["entries"]["cpu/dh<=256"]  # no GPU here: the "cpu" architecture
    assert written["recurrent"]["warps"] == result["setting"]["recurrent.warps"] and "tune_launch.py" in written["source"]
    fallback = json.loads(table.read_text())["entries"]["sm90/dh<=256"]
    assert {name: set(section) for name, section in written.items() if name != "source"} == {
        name: set(section) for name, section in fallback.items() if name != "source"}  # every section, complete


@pytest.mark.slow
def test_train_throughput_reports_each_backend(tmp_path):
    out = tmp_path / "throughput.json"
    _load("train_throughput").main(["--tiny", "--backends", "native_chunkwise", "native_recurrent", "--reps", "10",
                                    "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in rows] == ["native_chunkwise", "native_recurrent"]
    assert all(r["tokens_per_s"] > 0 and r["params_M"] > 0 for r in rows)


@pytest.mark.slow
def test_checkpoint_cost_times_each_part_of_a_save(tmp_path):
    out = tmp_path / "cost.json"
    _load("checkpoint_cost").main(["--size", "tiny", "--saves", "2", "--dir", str(tmp_path / "ckpt"), "--out",
                                   str(out)])
    result = json.loads(out.read_text())
    assert [row["step"] for row in result["saves"]] == [1, 2]
    assert all(row["files"] >= 3 and row["bytes"] > 0 for row in result["saves"])  # orbax compresses the arrays
    assert set(result["median"]) == {"save_blocking_s", "commit_s", "checksum_s", "verify_s", "restore_s"}
    assert not (tmp_path / "ckpt").exists()


def test_dispatch_cost_times_the_state_both_ways(tmp_path):
    out = tmp_path / "dispatch.json"
    _load("dispatch_cost").main(["--blocks", "2", "--calls", "3", "--rounds", "1", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["blocks"] == 2 and row["train_arrays"] > row["param_arrays"] > 0
    assert all(row[key] > 0 for key in ("train_state_us", "train_flat_us", "params_state_us", "params_flat_us"))


@pytest.mark.slow
def test_stage_profiler_times_every_stage_and_sweeps(tmp_path, capsys):
    profiler = _load("profile_stages")
    out = tmp_path / "stages.json"
    # two heads: the backward stages take the forward's (B, NH, ...) residuals flattened to (B·NH, ...)
    profiler.main(["--shape", "1,2,32,16,16", "--dtype", "float32", "--runs", "xl:32", "--reps", "1",
                   "--out", str(out)])
    ms = json.loads(out.read_text())["results"]["xl:32"]
    stages = {"fw.states", "fw.total", "bw.denominator", "bw.state_cotangents", "bw.parallel", "bw.total", "fwbw"}
    assert set(ms) == stages and all(t > 0 for t in ms.values())
    profiler.main(["--shape", "1,1,64,16,16", "--dtype", "float32", "--runs", "xl:64:32:16:16", "--reps", "1",
                   "--stages", "fw.total", "--out", str(out)])
    assert set(json.loads(out.read_text())["results"]["xl:64:32:16:16"]) == {"fw.total"}
    assert profiler.config("xl", 64, "float32", (32, 16, 16)).tile_q == 32

    profiler.main(["--shape", "1,1,32,16,16", "--dtype", "float32", "--runs", "limit:16", "--reps", "1",
                   "--stages", "fw.states", "--sweep", "recurrent.block=16,32", "recurrent.warps=1,2",
                   "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["limit:16"]
    assert len(rows) == 4 and not any(r["wrong"] or "error" in r for r in rows)
    assert sorted(tuple(r["launch"].values()) for r in rows) == [(16, 1), (16, 2), (32, 1), (32, 2)]


@pytest.mark.slow
def test_decode_bench_times_the_step(tmp_path):
    out = tmp_path / "decode.json"
    _load("decode_bench").main(["--tiny", "--parts", "step", "--reps", "10", "--json", str(out)])
    rows = json.loads(out.read_text())["step"]
    assert {r["what"] for r in rows} == {"mlstm_step native", "recurrent_step_fw (seed)"}
    assert all(r["us"] > 0 for r in rows)


@pytest.mark.slow
def test_variant_cost_times_every_variant(tmp_path):
    out = tmp_path / "variants.json"
    _load("variant_cost").main(["--tiny", "--backends", "native_chunkwise", "--reps", "10", "--rounds", "1",
                                "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["plain", "segment_ids", "sigmoid"]
    assert all(r["fw_ms"] > 0 and r["fwbw_ms"] > 0 for r in rows)


def test_plot_decode_draws_ours_beside_the_peer(tmp_path):
    step = tmp_path / "step.json"
    step.write_text(json.dumps({"step": [
        {"what": "mlstm_step triton", "states": "float32", "us": 55.9, "kernel_us": 37.5},
        {"what": "mlstm_step native", "states": "float32", "us": 62.4, "kernel_us": None},
        {"what": "mlstm_step triton", "states": "bfloat16", "us": 34.6, "kernel_us": 19.6}]}))
    generate = tmp_path / "generate.json"
    generate.write_text(json.dumps({"generate": [
        {"B": 1, "what": "generate, 128-token prompt", "tokens_per_s": 180.0},
        {"B": 16, "what": "generate, 128-token prompt", "tokens_per_s": 2963.0},
        {"B": 1, "what": "time to first token", "prompt": 8192, "ms": 207.6}]}))
    peer = tmp_path / "peer.json"
    peer.write_text(json.dumps({
        "step": [{"what": "mlstm_kernels triton step, CUDA graph", "us": 50.7}],
        "generate": [{"B": 1, "what": "generate", "tokens_per_s": 27.0},
                     {"B": 1, "what": "time to first token", "prompt": 8192, "ms": 258.4}],
        "graphs": [{"B": 1, "what": "decode step, CUDA graph", "tokens_per_s": 149.0}]}))
    plot = _load("plot_decode")
    bars = plot._step_bars(json.loads(step.read_text())["step"], json.loads(peer.read_text())["step"])
    assert [(b[0], b[1]) for b in bars] == [("mlstm_step triton (loop)", 55.9), ("mlstm_step triton (kernel)", 37.5),
                                            ("mlstm_step native (loop)", 62.4),
                                            ("upstream triton step, CUDA graph", 50.7)]
    plot.main(["--step", str(step), "--generate", str(generate), "--peer", str(peer), "--out",
               str(tmp_path / "decode.png")])
    assert (tmp_path / "decode.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="error: nothing to draw"):
        plot.main(["--out", str(tmp_path / "none.png")])
    with pytest.raises(SystemExit, match="does not exist"):
        plot.main(["--peer", str(tmp_path / "missing.json")])


@pytest.mark.slow
def test_multi_gpu_scripts_run_on_fake_devices(tmp_path):
    """Issue 22's scripts at tiny sizes on 4 CPU devices: context-parallel scaling rows (8 devices skipped, not
    faked) and the weak-scaling batch of the throughput script."""
    run_on_devices("multi_gpu_scripts.py", 4, oks=2, args=[SCRIPTS, tmp_path / "cp.json", tmp_path / "tp.json"])


@pytest.mark.slow
def test_serve_step_profile_splits_each_step_by_kind_and_place(tmp_path):
    out = tmp_path / "serve_step.json"
    rows = _load("profile_serve_step").main(["--tiny", "--variants", "decode,mixed:32:native_chunkwise:16,prefill:32",
                                             "--slots", "2", "--calls", "1", "--reps", "2", "--json", str(out)])
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["decode", "mixed:32:native_chunkwise:16",
                                                                           "prefill:32"]
    for row in rows:
        assert row["step_ms"] > 0 and row["device_busy_ms"] > 0
        places = row["by_place_ms"]
        for place in ("project", "mlstm_cell", "output", "ffn"):
            assert places[place] > 0, (row["variant"], place)
        assert row["by_kind_ms"]["matmul"] > 0 and sum(row["kind_place_ms"].values()) > 0
    decode, mixed, prefill = rows
    assert decode["by_place_ms"]["sample"] > 0 and mixed["by_place_ms"]["sample"] > 0
    assert prefill["by_place_ms"]["sample"] == 0  # a prefill chunk samples nothing


@pytest.mark.slow
def test_kernel_resources_compiles_each_kernel_for_hopper_without_a_gpu(tmp_path):
    """Triton's bundled ptxas and cuobjdump: every per-chunk kernel of both families (of each sweep point) compiled
    for sm_90 with its registers, stack and shared memory (its own process: Triton's interpreter, which other tests run, patches
    triton.language for the process)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "XLSTM_JAX_TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPTS / "kernel_resources.py"), "--head-dims", "32,64", "--chunk",
                           "16", "--seq-len", "64", "--sweep", "limit.fused_bw=0,1", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["point"]["fused_bw"], r["kernel"]) for r in rows] == [
        (0, "fw output"), (0, "bw dq"), (0, "bw dk/dv"), (1, "fw output"), (1, "bw dq+dk+dv")]
    assert all(0 < r["REG"] <= 255 and r["STACK"] >= 0 and r["SHARED"] > 0 for r in rows)
    assert [r["warps"] for r in rows] == [4, 8, 4, 4, 8]  # the table's warps and dq_warps
    proc = subprocess.run([sys.executable, str(SCRIPTS / "kernel_resources.py"), "--family", "xl", "--head-dims",
                           "32,64", "--chunk", "32", "--seq-len", "64", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["fw output", "bw dq", "bw dk", "bw dv"]
    assert all(0 < r["REG"] <= 255 for r in rows)
