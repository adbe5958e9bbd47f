"""Packed documents with the sequence split over 4 devices (tests/op/test_segments.py): boundaries at and inside
shards and one-token documents in a row across a shard border; the gradients of q, k, v, i, f equal the one-device
call's, for both combines.

usage: segments_across_shards.py (no arguments); prints one "ok" line per combine."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from tests.support.backend_cases import assert_trees_close
from xlstm_jax import mlstm

mesh = jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))
rng = np.random.default_rng(0)
B, NH, S, D = 2, 2, 96, 8
q, k, v = (jnp.asarray(rng.standard_normal((B, NH, S, D)), jnp.float32) for _ in range(3))
i, f = (jnp.asarray(rng.standard_normal((B, NH, S)), jnp.float32) for _ in range(2))
# shards of 24: boundaries at a shard start (24, 48, 72), inside shards (30, 60, 84), and one-token documents in a
# row (starts at 40, 41, 42, and 71, 72, 73 across a shard border)
starts = sum((np.arange(S) >= p) for p in (30, 40, 41, 42, 71, 73))
seg = jnp.asarray(np.repeat([[0, 0, 1, 1, 1, 2, 2, 3], [5, 5, 5, 5, 6, 6, 7, 7]], 12, axis=1) * 10 +
                  starts[None], jnp.int32)
w = jnp.asarray(rng.standard_normal((B, NH, S, D)), jnp.float32)
seq4, seq3 = P(None, None, "sp", None), P(None, None, "sp")


def loss(q, k, v, i, f, seg, axis, combine):
    h, (c, n, m) = mlstm(q, k, v, i, f, segment_ids=seg, backend="native_chunkwise", chunk_size=16,
                         return_last_states=True, sequence_axis_name=axis, sequence_combine=combine)
    total = jnp.sum(h * w) if axis is None else jax.lax.psum(jnp.sum(h * w_local(axis)), axis)
    return total + jnp.sum(c * jnp.exp(m)[..., None, None])


def w_local(axis):
    d = jax.lax.axis_index(axis)
    return jax.lax.dynamic_slice_in_dim(w, d * (S // 4), S // 4, axis=2)


grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
want = jax.jit(lambda *a: grad(*a, None, "auto"))(q, k, v, i, f, seg)
for combine in ("all_gather", "ppermute"):
    split = jax.shard_map(lambda *a: grad(*a, "sp", combine), mesh=mesh,
                          in_specs=(seq4, seq4, seq4, seq3, seq3, P(None, "sp")), out_specs=(seq4,) * 3 + (seq3,) * 2)
    got = jax.jit(split)(q, k, v, i, f, seg)
    assert_trees_close(got, want, rtol=1e-4, what=combine)
    print("ok", combine, flush=True)
