"""`xlstm-jax train` in two processes on one machine (jax.distributed on the loopback address, gloo collectives on
CPU, two fake devices each): the job follows the one-process run on the same four-device mesh step for step, only
process 0 reports, and the checkpoint and model export land once."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.support.devices import fake_cpu_env, free_port
from xlstm_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # two training processes

MAIN = "import sys; from xlstm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
COMMON = ["train", "--steps", "6", "--batch-size", "8", "--eval-batches", "2", "--log-every", "1", "--dtype",
          "float32", "--backend", "native_chunkwise", "--chunk-size", "16", "--mesh", "data=2,fsdp=2",
          "--num-blocks", "1", "--no-progress", "--json"]  # one block: the same sharding, a third less compile time


# gloo's own connection report on stdout, "[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected
# peer ranks is : 1", comes in the pieces of its C++ stream writes, which reach the pipe split by newlines and in
# between each other's (" peer ranks. " and "Expected number ... is : " are two writes, and another process's line
# can land between them): taken out piece by piece, whatever is left was printed by us
GLOO_PIECES = re.compile(r"\[Gloo\] Rank | is connected to | peer ranks\. "
                         r"|Expected number of connected peer ranks is : |\d+|\s")


def test_two_processes_follow_the_one_process_run(tmp_path):
    single = subprocess.run([sys.executable, "-c", MAIN, *COMMON, "--output-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=fake_cpu_env(4), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", MAIN, *COMMON, "--output-dir", str(tmp_path / "two"),
                               "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(index)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fake_cpu_env(2))
             for index in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert GLOO_PIECES.sub("", outputs[1][0]) == "", outputs[1][0]  # process 1 prints nothing of ours
    reports = [line[line.index("{"):] for line in outputs[0][0].splitlines() if "{" in line]
    two_summary = json.loads(reports[-1])
    one_summary = json.loads(single.stdout.strip().splitlines()[-1])
    losses = [[r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("one", "two")]
    assert len(losses[1]) == 6
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-5 * abs(a), losses
    assert abs(two_summary["eval_loss"] - one_summary["eval_loss"]) <= 1e-5 * one_summary["eval_loss"]
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["5", "6"]  # every 6 // 4 steps, 2 kept
    assert os.path.exists(tmp_path / "two" / "model" / "config.json")
