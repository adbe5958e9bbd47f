"""Training runs that never lose work (issue 37): a diverging run stops before saving anything non-finite, a second
trainer on the same directory is refused, SIGINT / SIGTERM finish the step, checkpoint and exit 130 / 143 (one
process and two), failed writes are one error line, and output directories that are not ours are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.support.devices import fake_cpu_env, free_port
from xlstm_jax import cli
from xlstm_jax.train.checkpoints import RunCheckpointer
from xlstm_jax.train.guards import RunLock

TINY_ARGV = ["--vocab-size", "16", "--seq-len", "16", "--num-kv-pairs", "2", "--embedding-dim", "32",
             "--num-blocks", "1", "--batch-size", "4", "--chunk-size", "16"]
MAIN = "import sys; from xlstm_jax.cli import main; sys.exit(main(sys.argv[1:]))"


def _errors(text: str) -> list[str]:
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith("error:")]


def _weights(run_dir) -> dict[str, np.ndarray]:
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


@pytest.mark.slow
def test_a_diverging_run_stops_before_saving_anything_not_finite(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["train", *TINY_ARGV, "--output-dir", out, "--steps", "12", "--checkpoint-every", "2", "--no-progress"]
    assert cli.main([*argv, "--lr", "1e30"]) == 1
    [error] = _errors(capsys.readouterr().err)
    bad = int(error.split("not finite at step ")[1].split()[0])
    assert bad <= 4 and "--lr" in error
    assert not os.path.exists(os.path.join(out, "model"))
    steps = RunCheckpointer(out).steps()
    assert all(step < bad for step in steps) and f"the last checkpoint is step {max(steps)}" in error
    assert cli.main(["train", *TINY_ARGV, "--output-dir", str(tmp_path / "inf"), "--lr", "inf"]) == 2
    assert "--lr" in _errors(capsys.readouterr().err)[0]


@pytest.mark.slow
def test_a_run_that_diverges_later_keeps_its_finite_checkpoints(tmp_path, capsys, monkeypatch):
    """The loss turns NaN at step 5 (a corrupted batch): checkpoints 2 and 4 stay, nothing later is written, the
    error names the step and the checkpoint to resume from."""
    from xlstm_jax.train import tasks

    original = tasks.MQARTask.train_batch

    def poisoned(self, step):
        batch = original(self, step)
        return {**batch, "mask": batch["mask"] * np.nan} if step == 4 else batch

    monkeypatch.setattr(tasks.MQARTask, "train_batch", poisoned)
    out = str(tmp_path / "run")
    argv = ["train", *TINY_ARGV, "--output-dir", out, "--steps", "12", "--checkpoint-every", "2",
            "--keep-checkpoints", "1", "--no-progress"]
    assert cli.main(argv) == 1
    [error] = _errors(capsys.readouterr().err)
    assert "not finite at step 5" in error and "the last checkpoint is step 4" in error
    assert RunCheckpointer(out).steps() == [4]


@pytest.mark.slow
def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(str(out))
    lock.acquire()
    try:
        assert cli.main(["train", *TINY_ARGV, "--output-dir", str(out), "--resume", "--steps", "2"]) == 2
        [error] = _errors(capsys.readouterr().err)
        assert "--output-dir" in error and "another trainer (pid" in error
    finally:
        lock.release()
    # a holder that died leaves no stale lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from xlstm_jax.train.guards import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True, env=fake_cpu_env(1))
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert cli.main(["train", *TINY_ARGV, "--output-dir", str(out), "--resume", "--steps", "2", "--no-progress"]) == 0


@pytest.mark.parametrize("argv, named", [
    (["--output-dir", ""], "is empty"),
    (["--seed", str(2**63)], "--seed"),
    (["--lr", "nan"], "--lr"),
])
def test_bad_run_settings_are_one_error_line(argv, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *TINY_ARGV, "--steps", "2", *argv]) == 2
    [error] = _errors(capsys.readouterr().err)
    assert named in error
    assert os.listdir(tmp_path) == []  # nothing created in the working directory


def test_a_directory_that_holds_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    for resume in ([], ["--resume"]):
        assert cli.main(["train", *TINY_ARGV, "--steps", "2", "--output-dir", str(tmp_path), *resume]) == 2
        [error] = _errors(capsys.readouterr().err)
        assert "notes.txt" in error and "no run of xlstm-jax" in error
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    blocked = tmp_path / "notes.txt" / "run"
    assert cli.main(["train", *TINY_ARGV, "--steps", "2", "--output-dir", str(blocked)]) == 2
    assert "cannot create or write" in _errors(capsys.readouterr().err)[0]


@pytest.mark.slow
def test_a_failed_checkpoint_write_is_one_error_line_and_the_last_good_one_stays(tmp_path, capsys, monkeypatch):
    """The asynchronous commit of checkpoint 4 fails as TensorStore reports a full disk: the run stops at the next
    step with one line naming the directory and the cause; checkpoint 2 is intact and resumable."""
    from xlstm_jax.train import checkpoints

    original = checkpoints.RunCheckpointer._checksum_when_committed

    def full_disk(self, step):
        if step == 4:
            self._hash_error = RuntimeError("Traceback ...\nOUT_OF_RANGE: Error writing local file "
                                            f"\"{self.directory}/4/x\": No space left on device [OS error 28]")
            return
        original(self, step)

    monkeypatch.setattr(checkpoints.RunCheckpointer, "_checksum_when_committed", full_disk)
    out = str(tmp_path / "run")
    argv = ["train", *TINY_ARGV, "--output-dir", out, "--steps", "12", "--checkpoint-every", "2", "--no-progress"]
    assert cli.main(argv) == 1
    [error] = _errors(capsys.readouterr().err)
    assert "could not write" in error and "No space left on device" in error and out in error
    assert 2 in RunCheckpointer(out).steps()


def _until_step(proc: subprocess.Popen, step: int) -> None:
    """Read the trainer's output until it has logged `step`."""
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line, "the trainer ended early"
        if line.startswith("step") and "/" in line.split()[1] and int(line.split()[1].split("/")[0]) >= step:
            return
    raise AssertionError("no progress")


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130)])  # SIGTERM (143): the two-process test below
def test_a_signal_checkpoints_the_step_and_the_resumed_run_ends_as_an_uninterrupted_one(sig, status, tmp_path):
    argv = ["train", *TINY_ARGV, "--steps", "40", "--checkpoint-every", "20", "--progress-seconds", "0"]
    straight = subprocess.run([sys.executable, "-c", MAIN, *argv, "--output-dir", str(tmp_path / "straight")],
                              capture_output=True, text=True, env=fake_cpu_env(1), timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", MAIN, *argv, "--output-dir", out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=fake_cpu_env(1))  # SIGINT at its default disposition
    _until_step(proc, 3)
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-3000:]
    [error] = _errors(err)
    stopped = int(error.split("after step ")[1].split(":")[0])
    assert signal.Signals(sig).name in error and "--resume" in error and 3 <= stopped < 40
    assert stopped in RunCheckpointer(out).steps()
    assert not [name for name in os.listdir(os.path.join(out, "checkpoints")) if "tmp" in name]
    resumed = subprocess.run([sys.executable, "-c", MAIN, "train", "--output-dir", out, "--resume", "--no-progress"],
                             capture_output=True, text=True, env=fake_cpu_env(1), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _weights(tmp_path / "straight"), _weights(out)
    assert all(np.array_equal(want[name], got[name]) for name in want)


@pytest.mark.slow
def test_sigterm_on_two_processes_stops_both_at_one_step_and_resumes_exactly(tmp_path):
    """Two processes (jax.distributed on loopback, as tests/distributed/test_train_multihost.py): SIGTERM to both
    after a logged step; they agree on the step, checkpoint it and exit 143; resumed, the run ends with the parameters
    of an uninterrupted two-process run."""
    common = ["train", *TINY_ARGV, "--batch-size", "8", "--steps", "30", "--checkpoint-every", "10", "--log-every",
              "1", "--mesh", "data=4", "--dtype", "float32", "--progress-seconds", "0"]

    def launch(out, *extra):
        coordinator = f"127.0.0.1:{free_port()}"
        return [subprocess.Popen([sys.executable, "-c", MAIN, *common, "--output-dir", out, *extra, "--coordinator",
                                  coordinator, "--num-processes", "2", "--process-id", str(index)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fake_cpu_env(2))
                for index in range(2)]

    straight = launch(str(tmp_path / "straight"))
    for proc in straight:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    out = str(tmp_path / "run")
    procs = launch(out)
    _until_step(procs[0], 3)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [143, 143], [err[-2000:] for _, err in results]
    steps = {int(err.split("after step ")[1].split(":")[0]) for _, err in results}
    assert len(steps) == 1 and steps <= set(RunCheckpointer(out).steps())
    resumed = launch(out, "--resume")
    for proc in resumed:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    want, got = _weights(tmp_path / "straight"), _weights(out)
    assert all(np.array_equal(want[name], got[name]) for name in want)
