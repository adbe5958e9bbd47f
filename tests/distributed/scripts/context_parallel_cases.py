"""Context parallelism on fake devices (tests/distributed/test_context_parallel.py): for each case, one sequence split
over `devices` devices inside shard_map gives the one-device call's outputs, last states and gradients.

usage: context_parallel_cases.py CASES, CASES a JSON list of [backend, devices, combine, with_state]; prints one "ok"
line per case."""

import functools
import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import xlstm_jax
from tests.support.backend_cases import assert_trees_close
from tests.support.helpers import _loss, make_inputs, make_weights

for backend, devices, combine, with_state in json.loads(sys.argv[1]):
    mesh = jax.make_mesh((devices,), ("sp",), devices=jax.devices()[:devices])
    x = make_inputs(devices, 1, 2, 20 * devices, 16, 16, with_state=True)  # 20 tokens per device: not a chunk multiple
    w = make_weights(devices, x)
    if not with_state:
        x = {n: a for n, a in x.items() if not n.endswith("_initial")}
    spec = {n: P() if n.endswith("_initial") else P(None, None, "sp") for n in x}
    args = {n: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec[n])) for n, a in x.items()}
    run = functools.partial(xlstm_jax.mlstm, backend=backend, chunk_size=16, return_last_states=True)
    local = functools.partial(run, sequence_axis_name="sp", sequence_combine=combine)
    split = jax.shard_map(lambda a: local(**a), mesh=mesh, in_specs=(spec,),
                          out_specs=(P(None, None, "sp"), (P(), P(), P())))

    def loss(a, fn):
        h, states = fn(a)
        return _loss(h, states, w), (h, states)

    got = jax.jit(jax.value_and_grad(lambda a: loss(a, split), has_aux=True))(args)
    plain = {n: jnp.asarray(a) for n, a in x.items()}
    want = jax.jit(jax.value_and_grad(lambda a: loss(a, lambda b: run(**b)), has_aux=True))(plain)
    assert_trees_close(got, want, rtol=2e-5, what=f"{backend} on {devices} devices, {combine}, {with_state}")
    print("ok", backend, devices, combine, with_state, flush=True)
