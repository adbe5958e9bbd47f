"""The xLSTM model with the sequence split over 4 devices (tests/distributed/test_context_parallel.py): logits, the
loss on logits and last states, and every parameter gradient equal the one-device call; documents cross shard
borders.

usage: context_parallel_model.py (no arguments); prints one "ok" line."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.support.backend_cases import assert_trees_close
from tests.support.xlstm_large_helpers import random_model, tiny_config

mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])
model = random_model(tiny_config(), seed=3)
graphdef, params = nnx.split(model)
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(0, 40, (2, 4 * 24)), jnp.int32)
segments = jnp.asarray(np.repeat([[0, 0, 1, 1, 1, 2, 2, 3], [5, 5, 5, 5, 6, 6, 7, 7]], 12, axis=1), jnp.int32)
weights = jnp.asarray(rng.standard_normal((2, 4 * 24, 40)), jnp.float32)


def loss(params, tokens, segments, weights, axis):
    logits, states = nnx.merge(graphdef, params)(tokens, segment_ids=segments, return_states=True,
                                                 sequence_axis_name=axis)
    total = jnp.sum(weights * logits)
    if axis is not None:
        total = jax.lax.psum(total, axis)
    return total + sum(jnp.sum(s) for state in states for s in state), logits


seq = P(None, "sp")
split = jax.shard_map(lambda p, t, s, w: jax.value_and_grad(loss, has_aux=True)(p, t, s, w, "sp"), mesh=mesh,
                      in_specs=(P(), seq, seq, seq), out_specs=((P(), seq), P()))
put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
got = jax.jit(split)(params, put(tokens, seq), put(segments, seq), put(weights, seq))
want = jax.jit(lambda *a: jax.value_and_grad(loss, has_aux=True)(*a, None))(params, tokens, segments, weights)
assert_trees_close(got, want, rtol=1e-4, what="model")  # float32: the sums run in another order (3e-5 seen)
print("ok model", flush=True)
