"""Resuming and watching a training run: `--resume` from the output directory alone, a longer `--steps` that keeps
the learning rate continuous, what a run prints before and while it trains, and `metrics.jsonl` across a resume."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from xlstm_jax import cli
from xlstm_jax.train.config import ConfigError, TrainConfig
from xlstm_jax.train.metrics import read_metrics
from xlstm_jax.train.steps import lr_schedule

TINY_ARGV = ["--vocab-size", "16", "--seq-len", "16", "--num-kv-pairs", "2", "--embedding-dim", "32",
             "--num-blocks", "1", "--batch-size", "4", "--chunk-size", "16", "--lr", "2e-3", "--seed", "3"]


def _train(*argv: str) -> int:
    return cli.main(["train", *argv])


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.slow
def test_resume_takes_the_stored_settings_and_refuses_explicit_changes(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _train(*TINY_ARGV, "--steps", "6", "--output-dir", out, "--no-progress") == 0
    capsys.readouterr()
    # nothing but the directory: the stored vocabulary, width, learning rate and seed are used
    assert _train("--output-dir", out, "--resume", "--steps", "8", "--no-progress", "--log-every", "1") == 0
    assert "resumed from step 6" in capsys.readouterr().out
    stored = json.load(open(os.path.join(out, "train_config.json")))
    assert (stored["vocab_size"], stored["embedding_dim"], stored["learning_rate"], stored["seed"],
            stored["steps"], stored["log_every"]) == (16, 32, 2e-3, 3, 8, 1)
    # an option given explicitly must agree, unless it may change
    assert _train("--output-dir", out, "--resume", "--steps", "9", "--seed", "4") == 2
    err = capsys.readouterr().err
    assert _lines(err, "error:") == [line for line in err.splitlines() if line.strip()]
    assert "--seed" in err and "3 there, 4 now" in err
    assert _train("--output-dir", out, "--resume", "--steps", "9", "--seq-len", "16", "--eval-every", "1",
                  "--no-progress") == 0
    # the step size may change (a run that diverged goes on more carefully), and says so
    assert _train("--output-dir", out, "--resume", "--steps", "10", "--lr", "1e-3", "--no-progress") == 0
    assert "learning_rate 0.002 -> 0.001" in capsys.readouterr().out


def test_resumed_config_of_a_directory_without_a_stored_config_is_the_defaults(tmp_path):
    config = TrainConfig.resumed(str(tmp_path), steps=30)
    assert config.resume and config.steps == 30 and config.num_heads == TrainConfig().num_heads
    (tmp_path / "train_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        TrainConfig.resumed(str(tmp_path))


def _rates(config: TrainConfig, steps: int) -> np.ndarray:
    schedule = lr_schedule(config)
    return np.array([float(schedule(t)) for t in range(steps)])


@pytest.mark.parametrize("at", [5, 40, 100])
def test_an_extended_schedule_goes_on_from_the_rate_it_reached(at):
    """From the resume step on, the rate decays along a new cosine from where the planned schedule was to the
    floor at the new end: no jump at the boundary, monotone after it, the floor at the end; before it, the
    schedule of the plan."""
    planned = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-2, min_lr_ratio=0.1)
    extended = TrainConfig(steps=200, warmup_steps=10, learning_rate=1e-2, min_lr_ratio=0.1,
                           lr_segments=((0, 100), (at, 200)))
    before, after = _rates(planned, 200), _rates(extended, 200)
    np.testing.assert_allclose(after[:at], before[:at], rtol=1e-6)
    np.testing.assert_allclose(after[at], before[at], rtol=1e-5)
    assert np.all(np.diff(after[at:]) <= 1e-9) and after[-1] == pytest.approx(1e-3, rel=1e-3)
    largest_step = np.max(np.abs(np.diff(after[10:])))
    assert largest_step <= np.max(np.abs(np.diff(before[10:100]))) * 1.01 + 1e-9


@pytest.mark.slow
def test_a_longer_resume_prints_the_new_schedule_and_logs_a_continuous_rate(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _train(*TINY_ARGV, "--steps", "20", "--warmup-steps", "2", "--output-dir", out, "--no-progress",
                  "--log-every", "1", "--checkpoint-every", "10") == 0
    os.rename(os.path.join(out, "checkpoints", "20"), str(tmp_path / "moved"))  # as if stopped after step 10
    capsys.readouterr()
    assert _train("--output-dir", out, "--resume", "--steps", "40", "--no-progress") == 0
    text = capsys.readouterr().out
    [line] = [line for line in text.splitlines() if "new cosine" in line]
    assert "planned for 20 steps, now 40" in line and "from step 10" in line
    records = [r for r in read_metrics(out) if "learning_rate" in r]
    assert [r["step"] for r in records] == list(range(1, 41))  # the logging cadence, each step once
    rates = np.array([r["learning_rate"] for r in records])
    jumps = np.abs(np.diff(rates[2:]))  # after warmup
    assert np.max(jumps) < 0.2 * rates[9] and np.all(np.diff(rates[10:]) <= 1e-12)
    assert rates[-1] == pytest.approx(2e-4, rel=0.05)  # the rate of the last update, one step before the floor
    assert json.load(open(os.path.join(out, "train_config.json")))["lr_segments"] == [[0, 20], [10, 40]]
    # resumed again inside the extension, the extended schedule holds
    os.rename(os.path.join(out, "checkpoints", "40"), str(tmp_path / "moved40"))
    assert _train("--output-dir", out, "--resume", "--no-progress", "--log-every", "1") == 0
    again = [r["learning_rate"] for r in read_metrics(out) if "learning_rate" in r]
    np.testing.assert_allclose(again, rates, rtol=1e-6)


@pytest.mark.slow
def test_a_run_says_where_and_what_before_compiling_and_reports_its_first_step(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _train(*TINY_ARGV, "--steps", "12", "--output-dir", out, "--progress-seconds", "1000") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"output: {out}"
    assert lines[1].startswith("data: MQAR") and "2 key-value pairs" in lines[1]
    assert lines[2].startswith("model: ") and "parameters" in lines[2] and "native_chunkwise" in lines[2]
    first = [line for line in lines if "/12  loss" in line]
    assert first and first[0].split()[1] == "1/12" and "first step" in first[0]
    evals = [line for line in lines if line.startswith("step") and "eval loss" in line]
    assert [line.split()[1] for line in evals] == ["3", "6", "9", "12"]  # a short run evaluates more than once


@pytest.mark.slow
def test_metrics_hold_each_evaluation_once_across_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _train(*TINY_ARGV, "--steps", "8", "--output-dir", out, "--no-progress", "--log-every", "3",
                  "--progress-seconds", "0") == 0
    assert _train("--output-dir", out, "--resume", "--no-progress") == 0  # finished: nothing to train
    assert _train("--output-dir", out, "--resume", "--steps", "12", "--progress-seconds", "0") == 0
    records = read_metrics(out)
    evals = [r["step"] for r in records if "eval_loss" in r]
    logged = [r["step"] for r in records if "loss" in r]
    assert evals == [2, 4, 6, 8, 10, 12]
    assert logged == [3, 6, 8, 9, 12]  # multiples of --log-every and each run's last step, never a progress line


@pytest.mark.slow
def test_the_step_loop_compiles_nothing_after_its_first_step(tmp_path, monkeypatch):
    """Between the first step (which compiles the train step; the timed window starts when it ends) and the first
    evaluation, nothing is compiled: a compile there stalls the steps and lowers the tokens/s of its logging window.
    The logged learning rate, evaluated op by op, compiled each operation of the schedule (0.5 s on this CPU,
    twice the 10 steps before it) at the first logged step."""
    from xlstm_jax.train import loop

    window, compiles = {"open": False, "closed": False}, []
    build_steps, evaluate = loop.build_steps, loop.evaluate

    def steps_opening_the_window(*args, **kwargs):
        train_step, eval_sums = build_steps(*args, **kwargs)

        def step(*a):
            out = jax.block_until_ready(train_step(*a))
            window["open"] = not window["closed"]
            return out

        return step, eval_sums

    def evaluation(*args, **kwargs):
        window.update(open=False, closed=True)
        return evaluate(*args, **kwargs)

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and window["open"]:
            compiles.append(seconds)

    monkeypatch.setattr(loop, "build_steps", steps_opening_the_window)
    monkeypatch.setattr(loop, "evaluate", evaluation)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        assert _train(*TINY_ARGV, "--steps", "12", "--log-every", "5", "--eval-every", "1000", "--no-progress",
                      "--output-dir", str(tmp_path / "run")) == 0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert window["closed"] and compiles == []
