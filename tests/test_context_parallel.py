"""Context parallelism (`xlstm_jax.mlstm(..., sequence_axis_name=...)` inside shard_map): one sequence split over
2, 4 and 8 (fake CPU) devices gives the outputs, last states and every gradient of the one-device call, for the
chunkwise backends and both combines; bad axis names and backends are refused before any kernel runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from devices import run_on_devices
from helpers import make_inputs

import xlstm_jax

SCRIPT = """
import functools
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from backend_cases import assert_trees_close
from helpers import _loss, make_inputs, make_weights
import xlstm_jax

for backend, devices, combine, with_state in {cases!r}:
    mesh = jax.make_mesh((devices,), ("sp",), devices=jax.devices()[:devices])
    x = make_inputs(devices, 1, 2, 20 * devices, 16, 16, with_state=True)  # 20 tokens per device: not a chunk multiple
    w = make_weights(devices, x)
    if not with_state:
        x = {{n: a for n, a in x.items() if not n.endswith("_initial")}}
    spec = {{n: P() if n.endswith("_initial") else P(None, None, "sp") for n in x}}
    args = {{n: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec[n])) for n, a in x.items()}}
    run = functools.partial(xlstm_jax.mlstm, backend=backend, chunk_size=16, return_last_states=True)
    local = functools.partial(run, sequence_axis_name="sp", sequence_combine=combine)
    split = jax.shard_map(lambda a: local(**a), mesh=mesh, in_specs=(spec,),
                          out_specs=(P(None, None, "sp"), (P(), P(), P())))

    def loss(a, fn):
        h, states = fn(a)
        return _loss(h, states, w), (h, states)

    got = jax.jit(jax.value_and_grad(lambda a: loss(a, split), has_aux=True))(args)
    plain = {{n: jnp.asarray(a) for n, a in x.items()}}
    want = jax.jit(jax.value_and_grad(lambda a: loss(a, lambda b: run(**b)), has_aux=True))(plain)
    assert_trees_close(got, want, rtol=2e-5, what=f"{{backend}} on {{devices}} devices, {{combine}}, {{with_state}}")
    print("ok", backend, devices, combine, with_state, flush=True)
"""

CASES = [
    ("native_chunkwise", 2, "all_gather", True),
    ("native_chunkwise", 4, "ppermute", False),
    ("native_chunkwise", 8, "all_gather", True),
    ("native_chunkwise", 8, "ppermute", True),
    ("native_chunkwise", 3, "auto", True),
    ("triton_limit_chunk", 2, "ppermute", True),
    ("triton_limit_chunk", 4, "all_gather", False),
    ("triton_xl_chunk", 2, "all_gather", True),
    ("triton_xl_chunk", 4, "ppermute", True),
]


def _run(cases):
    run_on_devices(SCRIPT.format(cases=cases), 8, oks=len(cases))


@pytest.mark.parametrize("backend", ["native_chunkwise", "triton_limit_chunk", "triton_xl_chunk"])
def test_a_sequence_split_over_devices_equals_the_one_device_call(backend):
    """Outputs, last states (the same on every device) and the gradients of q, k, v, i, f and the initial states,
    with a loss on h and on the last states."""
    _run([c for c in CASES if c[0] == backend])


def _inputs():
    x = make_inputs(0, 1, 2, 32, 16, 16)
    return {n: jnp.asarray(a) for n, a in x.items()}


@pytest.mark.parametrize("backend", ["native_parallel", "native_recurrent"])
def test_a_backend_without_context_parallelism_is_refused(backend):
    with pytest.raises(ValueError, match="sequence_axis_name"):
        xlstm_jax.mlstm(**_inputs(), backend=backend, sequence_axis_name="sp")


def test_an_axis_name_outside_shard_map_is_refused():
    with pytest.raises(ValueError, match="sequence_axis_name='sp' is not a mesh axis"):
        xlstm_jax.mlstm(**_inputs(), backend="native_chunkwise", sequence_axis_name="sp")


def test_an_unknown_combine_is_refused():
    with pytest.raises(ValueError, match="sequence_combine"):
        xlstm_jax.mlstm(**_inputs(), backend="native_chunkwise", sequence_axis_name="sp", sequence_combine="tree")


def test_a_one_device_axis_is_the_plain_call():
    """On a 1-device mesh the context-parallel path gives the plain call's values."""
    mesh = jax.make_mesh((1,), ("sp",), devices=jax.devices()[:1])
    spec = jax.sharding.PartitionSpec(None, None, "sp")
    x = {n: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec)) for n, a in _inputs().items()}
    split = jax.shard_map(
        lambda a: xlstm_jax.mlstm(**a, backend="native_chunkwise", sequence_axis_name="sp", return_last_states=True),
        mesh=mesh, in_specs=({n: spec for n in x},), out_specs=(spec, (jax.sharding.PartitionSpec(),) * 3),
    )
    got = jax.jit(split)(x)
    want = xlstm_jax.mlstm(**_inputs(), backend="native_chunkwise", return_last_states=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


BACKEND_SCRIPT = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from backend_cases import assert_trees_close
from devices import run_on_devices
from helpers import make_inputs
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import create_mlstm_backend

mesh = jax.make_mesh((2,), ("sp",), devices=jax.devices()[:2])
x = make_inputs(9, 1, 2, 40, 16, 16, with_state=True)
spec = {{n: P() if n.endswith("_initial") else P(None, None, "sp") for n in x}}
args = {{n: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec[n])) for n, a in x.items()}}
plain = {{n: jnp.asarray(a) for n, a in x.items()}}
for name, extra in (("chunkwise", {{}}), ("triton_kernels", {{"backend_name": "max_triton_xlchunksize"}})):
    split = create_mlstm_backend(name, chunk_size=16, sequence_axis_name="sp", **extra)
    whole = create_mlstm_backend(name, chunk_size=16, **extra)
    run = jax.shard_map(lambda a: split(**a, return_last_states=True), mesh=mesh, in_specs=(spec,),
                        out_specs=(P(None, None, "sp"), (P(), P(), P())))
    assert_trees_close(jax.jit(run)(args), whole(**plain, return_last_states=True), rtol=2e-5, what=name)
    print("ok", name, flush=True)
"""


def test_the_backend_classes_take_the_sequence_axis_from_their_config():
    run_on_devices(BACKEND_SCRIPT.format(), 8, oks=2)


MODEL_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from backend_cases import assert_trees_close
from xlstm_large_helpers import random_model, tiny_config

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
put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
got = jax.jit(split)(params, put(tokens, seq), put(segments, seq), put(weights, seq))
want = jax.jit(lambda *a: jax.value_and_grad(loss, has_aux=True)(*a, None))(params, tokens, segments, weights)
assert_trees_close(got, want, rtol=1e-4, what="model")  # float32: the sums run in another order (3e-5 seen)
print("ok model", flush=True)
"""


def test_the_model_runs_a_sequence_split_over_devices():
    """The xLSTM model inside shard_map with the sequence split over 4 devices: logits, the loss on logits and last
    states, and the gradients of every parameter equal the one-device call; documents (segment ids) cross shard
    borders."""
    run_on_devices(MODEL_SCRIPT.format(), 8)
