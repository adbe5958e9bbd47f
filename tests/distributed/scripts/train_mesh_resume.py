"""A run saved on one mesh resumes on another (tests/distributed/test_train_mesh.py): saved on data=2,fsdp=2,tensor=2
at step 5, resumed on fsdp=4,tensor=2, the parameters at step 10 equal the uninterrupted run's and are split the new
way.

usage: train_mesh_resume.py (no arguments); prints one "ok" line."""

import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from xlstm_jax.train import TrainConfig, train

base = dict(steps=10, batch_size=8, eval_batches=2, progress=False, compute_dtype="float32",
            backend="native_chunkwise", warmup_steps=2, eval_every=5, checkpoint_every=5, igate_bias_init=-10.0,
            fgate_bias_init_range=(3.0, 6.0))  # as in train_mesh_follows_one_device.py
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
