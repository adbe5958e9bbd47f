"""Every backend under `shard_map` on a 2 x 2 mesh (batch x heads), with and without initial states
(tests/op/test_transforms.py): outputs, last states and gradients equal the unsharded call.

usage: shard_map_batch_heads.py (no arguments; 4 devices); prints "ok" at the end."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.support.backend_cases import BACKENDS, assert_trees_close, backend_fn
from tests.support.helpers import _loss, make_inputs, make_weights

mesh = jax.make_mesh((2, 2), ("data", "heads"))
spec = {"q": P("data", "heads"), "k": P("data", "heads"), "v": P("data", "heads"), "i": P("data", "heads"),
        "f": P("data", "heads"), "c_initial": P("data", "heads"), "n_initial": P("data", "heads"),
        "m_initial": P("data", "heads")}
for with_state in (False, True):
    x = make_inputs(3, 2, 4, 20, 16, 16, with_state=with_state)
    w = make_weights(3, {**make_inputs(3, 2, 4, 20, 16, 16, with_state=True), **x})
    args = {n: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec[n])) for n, a in x.items()}
    for backend in BACKENDS:
        fn = backend_fn(backend)

        def loss(a, run):
            h, states = run(a)
            return _loss(h, states, w), (h, states)

        sharded = jax.shard_map(lambda a: fn(**a), mesh=mesh, in_specs=({n: spec[n] for n in args},),
                                out_specs=(P("data", "heads"), (P("data", "heads"),) * 3))
        got = jax.jit(jax.value_and_grad(lambda a: loss(a, sharded), has_aux=True))(args)
        want = jax.jit(jax.value_and_grad(lambda a: loss(a, lambda b: fn(**b)), has_aux=True))(args)
        assert_trees_close(got, want, rtol=1e-5, what=f"{backend} with_state={with_state}")
print("ok")
