"""`train` on meshes of 8 devices follows the one-device run (tests/distributed/test_train_mesh.py): 10 float32 steps
on data=2,fsdp=2,tensor=2 and on fsdp=2,tensor=2,sequence=2; losses, evaluation and parameters within 1e-4, every
matrix split over fsdp and tensor. Then the data=2,fsdp=2,tensor=2 run, cut back to its step-5 checkpoint, resumes
on fsdp=4,tensor=2: its parameters at step 10 equal the uninterrupted run's and are split the new way.

usage: train_mesh_follows_one_device.py (no arguments); prints one "ok" line per mesh and one for the resume."""

import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from xlstm_jax.train import TrainConfig, train
from xlstm_jax.train.metrics import read_metrics

# the xLSTM-7B gate initialisation: MQAR's input-gate biases start at 0 and stay near it, where a relative
# parameter comparison would measure Adam's sign sensitivity to near-zero gradients rather than the mesh
base = dict(steps=10, batch_size=8, eval_batches=2, progress=False, compute_dtype="float32", log_every=1,
            backend="native_chunkwise", chunk_size=16, igate_bias_init=-10.0, fgate_bias_init_range=(3.0, 6.0),
            checkpoint_every=5, num_blocks=1)  # one block: the same sharding, a third less compile time
root = tempfile.mkdtemp()


def run(name, mesh=None):
    out = os.path.join(root, name)
    result = train(TrainConfig(**base, mesh=mesh, output_dir=out))
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 10, losses
    return result, np.asarray(losses)


one, one_losses = run("one")
runs = {}
for name, mesh in (("3d", "data=2,fsdp=2,tensor=2"), ("sequence", "fsdp=2,tensor=2,sequence=2")):
    res, losses = run(name, mesh)
    runs[name] = res
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

whole, out = runs["3d"], os.path.join(root, "3d")
shutil.rmtree(os.path.join(out, "checkpoints", "10"))  # as if the run had stopped after step 5
resumed = train(TrainConfig(**base, mesh="fsdp=4,tensor=2", output_dir=out, resume=True))
for x, y in zip(jax.tree.leaves(nnx.state(resumed.model)), jax.tree.leaves(nnx.state(whole.model))):
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.linalg.norm(x64 - y64) <= 1e-5 * max(np.linalg.norm(y64), 1e-6)
up = resumed.model.backbone.blocks[0].ffn.proj_up.kernel[...]
assert tuple(up.sharding.spec) == ("fsdp", "tensor") and up.addressable_shards[0].data.size * 8 == up.size, up.sharding
print("ok resume", flush=True)
