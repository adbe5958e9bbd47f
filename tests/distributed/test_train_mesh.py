"""`xlstm-jax train --mesh`: runs on meshes of 8 fake CPU devices (data x fsdp x tensor, and with the sequence axis)
follow the one-device run step for step, with the matrices really split; a run resumes on another mesh; bad meshes
get one error line."""

import pytest

from tests.support.devices import run_on_devices
from xlstm_jax import cli

@pytest.mark.slow
def test_a_mesh_run_follows_the_one_device_run_and_resumes_on_another_mesh():
    """10 float32 steps on data=2,fsdp=2,tensor=2 and on fsdp=2,tensor=2,sequence=2 (context-parallel mLSTM): the
    losses in metrics.jsonl, the evaluation and the parameters equal the one-device run's within 1e-4, and every
    matrix is split over fsdp and tensor. The first, cut back to its step-5 checkpoint, resumes on fsdp=4,tensor=2:
    the parameters at step 10 equal those of the uninterrupted run, split the new way."""
    run_on_devices("train_mesh_follows_one_device.py", 8, oks=3)


def test_a_bfloat16_mesh_run_starts_from_the_one_device_loss():
    """The projections' partial sums over fsdp stay float32 (mixed_matmul under a mesh): step 1's loss on
    data=4,fsdp=2 equals the one-device run's within 1e-5 (bfloat16 partial results moved it by 8e-4)."""
    run_on_devices("train_bf16_mesh_first_step.py", 8)


@pytest.mark.parametrize("mesh, needle", [
    ("data=2", "multiply to 2, but there are 1 devices"),
    ("data=1,pipeline=1", "unknown axis 'pipeline'"),
    ("data=0", "positive size"),
    ("data=\u00b2", "digits 0-9"),
    ("data=1,data=1", "given twice"),
    ("sequence=1,tensor=1,data=1,fsdp=1,data", "given twice"),
])
def test_a_bad_mesh_is_one_error_line(mesh, needle, capsys):
    assert cli.main(["train", "--mesh", mesh, "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --mesh:") and needle in err[0], err
