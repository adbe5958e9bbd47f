"""Context parallelism (`xlstm_jax.mlstm(..., sequence_axis_name=...)` inside shard_map): one sequence split over
2, 4 and 8 (fake CPU) devices gives the outputs, last states and every gradient of the one-device call, for the
chunkwise backends and both combines; bad axis names and backends are refused before any kernel runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xlstm_jax
from tests.support.devices import run_on_devices
from tests.support.helpers import make_inputs

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
    run_on_devices("context_parallel_cases.py", 8, oks=len(cases), args=[json.dumps(cases)])


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_backend_classes_take_the_sequence_axis_from_their_config():
    run_on_devices("context_parallel_backend_classes.py", 8, oks=2)


@pytest.mark.slow
def test_the_model_runs_a_sequence_split_over_devices():
    """The xLSTM model inside shard_map with the sequence split over 4 devices: logits, the loss on logits and last
    states, and the gradients of every parameter equal the one-device call; documents (segment ids) cross shard
    borders."""
    run_on_devices("context_parallel_model.py", 8)
