"""The op is the one door into the kernels: the model and the documented Triton backend reach the launch through
`xlstm_jax.mlstm.dispatch`, with no generator factory on the way and at most 15 frames of xlstm_jax code from
`xLSTMLarge.__call__` to the kernel call (on one device and on a mesh alike)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.backend_cases import skip_unless_runnable
from tests.support.xlstm_large_helpers import random_model, random_tokens, tiny_config
from xlstm_jax.kernels import launch as launch_module
from xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend import mLSTMBackendTriton, mLSTMBackendTritonConfig

MAX_FRAMES = 15


class _Launched(Exception):
    pass


def _path_to_first_launch(monkeypatch, run) -> list[tuple[str, str]]:
    """(file, function) of every xlstm_jax frame from the outermost to the one that calls the kernel (the
    interpreter's stand-in for jax_triton.triton_call), for the first kernel `run()` launches."""
    if not launch_module.interpret_mode():
        pytest.skip("the frames are read where Triton's interpreter takes the launch (CPU)")
    stacks = []

    def stop(*args, **kwargs):
        stacks.append([(f.filename, f.function) for f in inspect.stack()[1:]])
        raise _Launched

    monkeypatch.setattr(launch_module, "_interpret", stop)
    with pytest.raises(_Launched):
        run()
    ours = [(f.split("xlstm_jax/")[-1], fn) for f, fn in stacks[0] if "/xlstm_jax/" in f]
    return list(reversed(ours))


@pytest.mark.slow
@pytest.mark.parametrize("on_mesh", [False, True], ids=["one_device", "mesh"])
def test_the_model_reaches_the_kernel_through_the_op_in_at_most_15_frames(monkeypatch, on_mesh):
    skip_unless_runnable("triton_limit_chunk")
    c = tiny_config(backend="triton_limit_chunk", chunk_size=16)
    model = random_model(c, seed=0)
    tokens = jnp.asarray(random_tokens(0, (1, 5), c.vocab_size))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def run():
        if not on_mesh:
            return model(tokens)
        with jax.set_mesh(mesh):
            return model(tokens, mesh_axes=("data", None, None))

    path = _path_to_first_launch(monkeypatch, run)
    functions = [fn for _, fn in path]
    assert path[0] == ("models/xlstm_large/model.py", "__call__"), path
    assert ("mlstm/api.py", "dispatch") in path, path
    assert (("mlstm/on_mesh.py", "run") in path) == on_mesh, path
    assert len(path) + 1 <= MAX_FRAMES, (len(path) + 1, functions)  # + the kernel call itself


def test_the_documented_triton_backend_goes_through_the_op_without_a_generator(monkeypatch):
    skip_unless_runnable("triton_limit_chunk")
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 16, 16)), jnp.float32)
    gates = jnp.zeros((1, 2, 16))
    backend = mLSTMBackendTriton(mLSTMBackendTritonConfig(chunk_size=16))
    path = _path_to_first_launch(monkeypatch, lambda: backend(q, q, q, gates, gates))
    files = {file for file, _ in path}
    assert ("mlstm/api.py", "dispatch") in path, path
    assert not any("mlstm_chunkwise/" in file for file in files), path  # no seed kernel module on the way
    assert not any("generator" in fn or fn == "_get_chunkwise_fwbw_kernel" for _, fn in path), path
