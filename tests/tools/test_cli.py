"""The `xlstm-jax` command: `doctor` runs, reports PASS for the native backends, and exits non-zero on a FAIL or a
refused version combination; `train` and `generate` run through the same entry point."""

import dataclasses
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from tests.support.backend_cases import NATIVE_BACKENDS
from xlstm_jax import cli, compat, doctor
from xlstm_jax.mlstm import step as step_module
from xlstm_jax.kernels.native.recurrent import mlstm_recurrent
from xlstm_jax.mlstm import IMPLEMENTATIONS

pytestmark = pytest.mark.slow  # the command in a subprocess, the doctor and training runs


def _rows(text):
    """backend name -> its line in the parity table."""
    parity = text.split("Parity vs float64 reference", 1)[1]
    return {name: line for line in parity.splitlines() for name in IMPLEMENTATIONS if f" {name} " in line}


def test_doctor_quick_passes_for_native_backends(capsys):
    assert cli.main(["doctor", "--quick"]) == 0
    text = capsys.readouterr().out
    for key in ("python", "jax", "jaxlib", "triton", "jax-triton"):
        assert key in text
    rows = _rows(text)
    for name in NATIVE_BACKENDS:
        assert "PASS" in rows[name], rows.get(name)
    for name in IMPLEMENTATIONS:
        assert name in rows and ("PASS" in rows[name] or "SKIP" in rows[name]), rows.get(name)
    assert "PASS" in _step_rows(text)["native"]
    assert "doctor: OK" in text


def _step_rows(text):
    """step backend -> its line in the decode step's table."""
    table = text.split("Decode step (mlstm_step) vs float64 reference", 1)[1]
    return {name: line for line in table.splitlines() for name in ("native", "triton") if f" {name} " in line}


def test_doctor_console_script_selected_backends():
    """The installed console script (or `python -m xlstm_jax.cli`), comma- and space-separated --backends."""
    script = shutil.which("xlstm-jax")
    command = [script] if script else [sys.executable, "-m", "xlstm_jax.cli"]
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [*command, "doctor", "--quick", "--backends", "native_recurrent,native_parallel"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(result.stdout)
    assert set(rows) == {"native_recurrent", "native_parallel"}
    assert all("PASS" in line for line in rows.values())


def test_doctor_rejects_an_unknown_backend(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["doctor", "--backends", "native_nope"])
    assert info.value.code == 2
    assert "native_nope" in capsys.readouterr().err


def _wrong_by_one_percent(x, o, chunk_size, tuning):
    h, states = mlstm_recurrent(x, dataclasses.replace(o, return_last_states=True))
    return h * jnp.asarray(1.01, h.dtype), states


def test_doctor_fails_on_a_wrong_backend(monkeypatch, capsys):
    monkeypatch.setitem(IMPLEMENTATIONS, "native_recurrent",
                        dataclasses.replace(IMPLEMENTATIONS["native_recurrent"], run=_wrong_by_one_percent))
    assert cli.main(["doctor", "--quick", "--backends", "native_recurrent"]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in _rows(text)["native_recurrent"]
    assert "doctor: FAIL" in text


def test_doctor_fails_on_a_wrong_decode_step(monkeypatch, capsys):
    """A step whose h is NaN (as the Triton step's was on a GPU under a wrong launch) fails the doctor."""
    real = step_module.step_native

    def nan_h(*args, **kwargs):
        h, states = real(*args, **kwargs)
        return h * jnp.nan, states

    monkeypatch.setattr(step_module, "step_native", nan_h)
    assert cli.main(["doctor", "--quick", "--backends", "native_recurrent"]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in _step_rows(text)["native"] and "PASS" in _rows(text)["native_recurrent"]
    assert "doctor: FAIL" in text


def test_doctor_refuses_a_known_bad_version_combination(monkeypatch, capsys):
    versions = {**compat.installed_versions(), "triton": "3.5.1", "jax_triton": "0.4.0"}
    monkeypatch.setattr(compat, "installed_versions", lambda: versions)
    assert doctor.run_doctor(backends=["native_recurrent"], quick=True) == 1
    text = capsys.readouterr().out
    assert "error" in text and "triton >= 3.6" in text and "refused" in text


def test_train_and_generate_run_through_the_top_level_command(tmp_path, capsys):
    """`xlstm-jax train` (the README's main job, shortened) and `xlstm-jax generate` on its output."""
    out_dir = str(tmp_path / "run")
    argv = ["train", "--vocab-size", "16", "--seq-len", "16", "--num-kv-pairs", "2", "--embedding-dim", "32",
            "--num-blocks", "1", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--eval-every", "3",
            "--chunk-size", "16", "--output-dir", out_dir, "--no-progress"]
    assert cli.main(argv) == 0
    assert "eval accuracy" in capsys.readouterr().out
    assert cli.main(["generate", out_dir, "--prompt-ids", "1 9 2", "--max-new-tokens", "2", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.startswith("prompt [1, 9, 2] -> ")
