"""A bfloat16 training run on data=4,fsdp=2 starts from the one-device run's loss (tests/distributed/
test_train_mesh.py): step 1's loss is the forward of the same initial parameters on the same batch, so the mesh
may change only the order of float32 sums. The partitioner splits the projections' contraction over fsdp; with
bfloat16 partial results (each rounded before the sum) the loss moved by 8e-4 relative at this size.

usage: train_bf16_mesh_first_step.py (no arguments); prints one "ok" line."""

import os
import tempfile

from xlstm_jax.train import TrainConfig, train
from xlstm_jax.train.metrics import read_metrics

base = dict(steps=2, warmup_steps=1, batch_size=8, eval_every=2, eval_batches=1, progress=False,
            compute_dtype="bfloat16", log_every=1, backend="native_chunkwise", chunk_size=16)
root = tempfile.mkdtemp()
first = {}
for name, mesh in (("one", None), ("fsdp", "data=4,fsdp=2")):
    out = os.path.join(root, name)
    train(TrainConfig(**base, mesh=mesh, output_dir=out))
    first[name] = next(r["loss"] for r in read_metrics(out) if "loss" in r)
assert abs(first["fsdp"] - first["one"]) <= 1e-5 * abs(first["one"]), first
print("ok", first, flush=True)
