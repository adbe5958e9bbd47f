"""Sharded inputs under jit. Auto mesh axes (4 fake CPU devices, data x heads): every backend gives the values and
gradients of the unsharded call; the native backends and the custom_partitioning wrapper of the Triton core
(kernels/sharding.py, checked here on XLA functions: on the CPU the Triton kernels run in host callbacks, which a
partitioned body cannot hold) keep the sharding and compile without an all-gather. Explicit mesh axes (8 devices,
data x heads x sp, the sequence split too): every backend gives the unsharded values and gradients, B and NH stay
sharded, and the chunkwise backends keep S split (context parallelism). Auto mesh axes with the sequence split: the
unsharded values without `mesh_axes` (the split sequence is gathered), the same with `mesh_axes` under `jax.set_mesh`
(S stays split for the chunkwise backends), and `mesh_axes` errors."""

import pytest

from tests.support.devices import run_on_devices

pytestmark = pytest.mark.slow  # every test runs a script on 4 or 8 devices in a subprocess


def test_batch_and_head_sharding_under_jit():
    run_on_devices("sharding_batch_heads.py", 4, oks=6)


def test_explicit_mesh_axes_with_the_sequence_split():
    run_on_devices("sharding_split_sequence.py", 8, oks=5, args=["explicit", "Explicit", 40])


def test_auto_mesh_axes_with_the_sequence_split():
    run_on_devices("sharding_split_sequence.py", 8, oks=6, args=["auto", "Auto", 32])
