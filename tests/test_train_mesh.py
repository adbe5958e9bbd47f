"""`xlstm-jax train --mesh`: runs on meshes of 8 fake CPU devices (data x fsdp x tensor, and with the sequence axis)
follow the one-device run step for step, with the matrices really split; a run resumes on another mesh; bad meshes
get one error line."""

import pytest
from devices import run_on_devices

from xlstm_jax import cli

SCRIPT = """
import os, tempfile
import jax, numpy as np
from flax import nnx
from xlstm_jax.train import TrainConfig, train
from xlstm_jax.train.metrics import read_metrics

# the xLSTM-7B gate initialisation: MQAR's input-gate biases start at 0 and stay near it, where a relative
# parameter comparison would measure Adam's sign sensitivity to near-zero gradients rather than the mesh
base = dict(steps=10, batch_size=8, eval_batches=2, progress=False, compute_dtype="float32", log_every=1,
            backend="native_chunkwise", chunk_size=16, igate_bias_init=-10.0, fgate_bias_init_range=(3.0, 6.0))
root = tempfile.mkdtemp()


def run(name, mesh=None):
    out = os.path.join(root, name)
    result = train(TrainConfig(**base, mesh=mesh, output_dir=out))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 10, losses
    return result, np.asarray(losses)


one, one_losses = run("one")
for name, mesh in (("3d", "data=2,fsdp=2,tensor=2"), ("sequence", "fsdp=2,tensor=2,sequence=2")):
    res, losses = run(name, mesh)
    np.testing.assert_allclose(losses, one_losses, rtol=1e-4, err_msg=name)
    assert abs(res.eval_loss - one.eval_loss) <= 1e-4 * abs(one.eval_loss), (name, res.eval_loss, one.eval_loss)
    worst = 0.0
    for x, y in zip(jax.tree.leaves(nnx.state(res.model)), jax.tree.leaves(nnx.state(one.model))):
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, np.linalg.norm(x64 - y64) / max(np.linalg.norm(y64), 1e-6))
    assert worst <= 1e-4, (name, worst)
    # every matrix is split over fsdp (its D axis) and tensor (its other axis, unless that is the odd vocabulary
    # of 17): a device holds a quarter (an eighth) of it
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(res.model, nnx.Param)):
        if x.ndim == 2:
            parts = 4 if 17 not in x.shape else 2
            assert x.addressable_shards[0].data.nbytes * parts == x.nbytes, (name, jax.tree_util.keystr(path),
                                                                             x.sharding)
    print("ok", name, worst, flush=True)
"""


def test_a_mesh_run_follows_the_one_device_run():
    """10 float32 steps on data=2,fsdp=2,tensor=2 and on fsdp=2,tensor=2,sequence=2 (context-parallel mLSTM): the
    losses in metrics.jsonl, the evaluation and the parameters equal the one-device run's within 1e-4, and every
    matrix is split over fsdp and tensor."""
    run_on_devices(SCRIPT, 8, oks=2)


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


RESUME_SCRIPT = """
import os, shutil, tempfile
import jax, numpy as np
from flax import nnx
from xlstm_jax.train import TrainConfig, train

base = dict(steps=10, batch_size=8, eval_batches=2, progress=False, compute_dtype="float32",
            backend="native_chunkwise", warmup_steps=2, eval_every=5, checkpoint_every=5, igate_bias_init=-10.0,
            fgate_bias_init_range=(3.0, 6.0))  # as in SCRIPT
out = os.path.join(tempfile.mkdtemp(), "run")
whole = train(TrainConfig(**base, mesh="data=2,fsdp=2,tensor=2", output_dir=out))
shutil.rmtree(os.path.join(out, "checkpoints", "10"))  # as if the run had stopped after step 5
resumed = train(TrainConfig(**base, mesh="fsdp=4,tensor=2", output_dir=out, resume=True))
for x, y in zip(jax.tree.leaves(nnx.state(resumed.model)), jax.tree.leaves(nnx.state(whole.model))):
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.linalg.norm(x64 - y64) <= 1e-5 * max(np.linalg.norm(y64), 1e-6)
up = resumed.model.backbone.blocks[0].ffn.proj_up.kernel[...]
assert tuple(up.sharding.spec) == ("fsdp", "tensor") and up.addressable_shards[0].data.size * 8 == up.size, up.sharding
print("ok", flush=True)
"""


def test_a_run_saved_on_one_mesh_resumes_on_another():
    """Saved on data=2,fsdp=2,tensor=2 at step 5, resumed on fsdp=4,tensor=2: the parameters at step 10 equal those
    of the uninterrupted run, and they are split the new way."""
    run_on_devices(RESUME_SCRIPT, 8)
