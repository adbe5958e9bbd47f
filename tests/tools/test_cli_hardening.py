"""`xlstm-jax train` / `generate` on user mistakes and damaged runs: one `error:` line naming the flag and exit
status 2 without a traceback; resume from the newest intact checkpoint with damaged ones kept aside; short runs
with the default cadence and output directory; progress lines without a terminal; `--help` without jax."""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import xlstm_jax
from xlstm_jax import cli
from xlstm_jax.mlstm import api
from xlstm_jax.models import xlstm_large
from xlstm_jax.train.checkpoints import DAMAGED_DIR
from xlstm_jax.train.cli import add_train_arguments, flag
from xlstm_jax.train.config import TrainConfig
from xlstm_jax.train.loop import train

TINY = dict(vocab_size=16, seq_len=16, num_kv_pairs=2, embedding_dim=32, num_heads=2, num_blocks=1, batch_size=4,
            chunk_size=16, progress=False)
TINY_ARGV = ["--vocab-size", "16", "--seq-len", "16", "--num-kv-pairs", "2", "--embedding-dim", "32",
             "--num-blocks", "1", "--batch-size", "4", "--chunk-size", "16"]
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax")


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _assert_one_error_line(text: str, *names: str) -> None:
    """Exactly one line of `text` starts with `error:`, it names each of `names`, and nothing is a traceback."""
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert all(name in errors[0] for name in names), errors[0]
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6, and its result."""
    out_dir = str(tmp_path_factory.mktemp("finished") / "run")
    config = TrainConfig(**TINY, steps=6, warmup_steps=1, eval_every=2, keep_checkpoints=3, output_dir=out_dir)
    return out_dir, train(config)


@pytest.mark.slow
def test_help_imports_no_jax_and_documents_every_flag_with_its_default(capsys):
    code = ("import sys\nfrom xlstm_jax import cli\nfor argv in ([], ['train']):\n"
            "    try:\n        cli.main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
            f"    print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("LOADED")] == ["LOADED []"] * 2
    # the lazily loaded top-level names: xlstm_jax.mlstm stays the function although its subpackage is imported
    assert xlstm_jax.mlstm is api.mlstm and xlstm_jax.BACKEND_NAMES is api.BACKEND_NAMES
    assert xlstm_jax.from_pretrained is xlstm_large.from_pretrained

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    entries = {}  # option -> its help entry
    for line in capsys.readouterr().out.split("options:", 1)[1].splitlines():
        if re.match(r"  -", line):
            option = line.split()[0].rstrip(",")
            entries[option] = line
        elif line.startswith("    "):
            entries[option] += line
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for action in options:
        assert action.help, action.option_strings
        entry = " ".join(entries[action.option_strings[0]].split())
        assert action.nargs == 0 or "(default:" in entry, entry  # switches have no default to show
    cli_fields = {f for f in TrainConfig.__dataclass_fields__ if f != "lr_segments"}  # kept by the run itself
    assert {flag(f) for f in cli_fields} <= {a.option_strings[0] for a in options}


@pytest.mark.slow
def test_short_run_defaults_follow_steps_and_write_to_a_new_runs_dir(tmp_path, monkeypatch, capsys):
    """`--steps 20` alone works (warmup, eval and checkpoint cadence follow it: a short run evaluates four times),
    writes runs/mqar-<timestamp>, says where, and prints progress lines without a terminal."""
    config = TrainConfig(steps=20)
    assert (config.warmup_steps, config.eval_every, config.checkpoint_every) == (2, 5, 5)
    assert (TrainConfig().warmup_steps, TrainConfig().eval_every) == (100, 750)  # the main job: 3000 steps
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *TINY_ARGV, "--steps", "20", "--progress-seconds", "0"]) == 0
    out = capsys.readouterr().out
    [run_dir] = glob.glob("runs/mqar-*")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints")), key=int) == ["15", "20"]
    assert os.path.exists(os.path.join(run_dir, "model", "config.json"))
    assert os.path.join(run_dir, "checkpoints") in out and os.path.join(run_dir, "model") in out
    assert f"xlstm-jax generate {run_dir}" in out
    progress = [line for line in out.splitlines() if "/20  loss" in line]
    assert len(progress) >= 10 and progress[-1].split()[1] == "20/20"


@pytest.mark.parametrize("argv, names", [
    (["--chunk-size", "24"], ["--chunk-size", "16..512"]),
    (["--backend", "triton_limit_chunk"], ["--backend", "cannot run here"]),
    (["--backend", "native_nope"], ["--backend", "native_chunkwise"]),
    (["--warmup-steps", "3"], ["--warmup-steps"]),
    (["--resume"], ["--resume", "--output-dir"]),
])
def test_bad_training_flags_are_one_error_line(argv, names, monkeypatch, capsys):
    monkeypatch.setenv("XLSTM_JAX_TRITON_INTERPRET", "0")
    assert cli.main(["train", *TINY_ARGV[:-2], "--steps", "3", "--warmup-steps", "1", *argv]) == 2
    captured = capsys.readouterr()
    _assert_one_error_line(captured.err, *names)
    assert captured.out == ""


@pytest.mark.slow
def test_reused_output_dir_changed_settings_and_too_few_steps_are_one_error_line(finished_run, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run[0], run_dir)
    before = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    argv = ["train", *TINY_ARGV, "--warmup-steps", "1", "--output-dir", run_dir]
    command = [sys.executable, "-m", "xlstm_jax.cli", *argv, "--steps", "6"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    _assert_one_error_line(result.stderr, "--output-dir", "--resume")
    for extra, names in ((["--steps", "8", "--seed", "1"], ["--seed"]), (["--steps", "5"], ["--steps", "6"])):
        assert cli.main([*argv, *extra, "--resume", "--no-progress"]) == 2
        _assert_one_error_line(capsys.readouterr().err, *names)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == before


def _files(path):
    return sorted(os.path.relpath(os.path.join(root, name), path) for root, _, names in os.walk(path)
                  for name in names)


@pytest.mark.slow
def test_resume_skips_damaged_newest_checkpoints_and_keeps_them_aside(finished_run, tmp_path, capsys):
    """Checkpoint 6 with truncated files and 4 without its item folder are skipped (reported, moved aside whole);
    the run continues from 2 exactly as the straight run did, and no intact checkpoint is deleted."""
    straight_dir, straight = finished_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight_dir, run_dir)
    ckpt = os.path.join(run_dir, "checkpoints")
    for path in glob.glob(os.path.join(ckpt, "6", "**"), recursive=True):
        if os.path.isfile(path):
            os.truncate(path, os.path.getsize(path) // 2)
    shutil.rmtree(os.path.join(ckpt, "4", "default"))
    damaged = {step: _files(os.path.join(ckpt, step)) for step in ("4", "6")}
    resumed = train(TrainConfig(**TINY, steps=6, warmup_steps=1, eval_every=2, keep_checkpoints=3,
                                output_dir=run_dir, resume=True))
    out = capsys.readouterr().out
    assert "checkpoint 6 is damaged" in out and "checkpoint 4 is damaged" in out and "resumed from step 2" in out
    for step, files in damaged.items():
        [aside] = glob.glob(os.path.join(run_dir, DAMAGED_DIR, f"{step}-*"))
        assert _files(aside) == files
    assert sorted(os.listdir(ckpt)) == ["2", "4", "6"]  # 2 kept, 4 and 6 written anew
    assert resumed.step == 6 and [h["step"] for h in resumed.history] == [4, 6]
    assert all(np.array_equal(a, b) for a, b in zip(_params(resumed.model), _params(straight.model)))


@pytest.mark.slow
def test_generate_on_a_damaged_or_missing_checkpoint_is_one_error_line(finished_run, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run[0], run_dir)
    os.truncate(os.path.join(run_dir, "train_config.json"), 20)
    assert cli.main(["generate", run_dir]) == 2
    _assert_one_error_line(capsys.readouterr().err, "MODEL", "train_config.json")
    assert cli.main(["generate", str(tmp_path / "missing"), "--prompt-ids", "1 2"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "MODEL", "missing")
    # truncated weights of the exported model: a CheckpointError from the checkpoint loader, one line here too
    model_dir = str(tmp_path / "model")
    shutil.copytree(os.path.join(finished_run[0], "model"), model_dir)
    weights = [name for name in os.listdir(model_dir) if name.endswith(".safetensors")]
    os.truncate(os.path.join(model_dir, weights[0]), 100)
    assert cli.main(["generate", model_dir, "--prompt-ids", "1 2"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "MODEL", weights[0])


@pytest.mark.slow
def test_from_pretrained_takes_a_training_directory_as_generate_does(finished_run, tmp_path):
    """`from_pretrained(run_dir)` loads the run's `model/` export; a run that has not exported one yet is a clear
    FileNotFoundError, not a message about missing safetensors."""
    run_dir, result = finished_run
    loaded = xlstm_large.from_pretrained(run_dir)
    assert all(np.array_equal(a, b) for a, b in zip(_params(loaded), _params(result.model)))
    unfinished = str(tmp_path / "unfinished")
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns("model"))
    with pytest.raises(FileNotFoundError, match="without an exported model"):
        xlstm_large.from_pretrained(unfinished)
