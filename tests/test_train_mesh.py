"""`xlstm-jax train --mesh`: a run on a data x fsdp x tensor mesh of 8 fake CPU devices follows the one-device run
(parameters after 10 steps, evaluation loss), with large parameters really split; bad meshes get one error line."""

import pytest
from devices import run_on_devices

from xlstm_jax import cli

SCRIPT = """
import jax, numpy as np
from xlstm_jax.train import TrainConfig, train

base = dict(steps=10, batch_size=8, eval_batches=2, progress=False, compute_dtype="float32", backend="native_chunkwise")
one = train(TrainConfig(**base))
mesh = train(TrainConfig(**base, mesh="data=2,fsdp=2,tensor=2"))
assert abs(mesh.eval_loss - one.eval_loss) <= 1e-4 * abs(one.eval_loss), (mesh.eval_loss, one.eval_loss)
from flax import nnx
a, b = nnx.state(mesh.model), nnx.state(one.model)
worst = 0.0
for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    worst = max(worst, np.linalg.norm(x64 - y64) / max(np.linalg.norm(y64), 1e-6))
assert worst <= 1e-4, worst
up = mesh.model.backbone.blocks[0].ffn.proj_up.kernel[...]
shard = up.addressable_shards[0].data
assert shard.size * 4 == up.size, (up.shape, shard.shape, up.sharding)  # split over fsdp (2) x tensor (2)
print("ok", worst, flush=True)
"""


def test_a_mesh_run_follows_the_one_device_run():
    run_on_devices(SCRIPT, 8)


@pytest.mark.parametrize("mesh, needle", [
    ("data=2", "multiply to 2, but there are 1 devices"),
    ("data=1,pipeline=1", "unknown axis 'pipeline'"),
    ("data=0", "positive size"),
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
            backend="native_chunkwise", warmup_steps=2, eval_every=5, checkpoint_every=5)
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
