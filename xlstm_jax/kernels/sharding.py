"""Batch and head sharding for kernels that XLA cannot partition on its own (custom calls).

`per_batch_head(fn)` wraps a function whose operands and results all lead with the (B, NH) axes and whose rows are
independent across them, with `jax.experimental.custom_partitioning`: under `jit`, operands sharded over B and/or NH
run where they are, each device on its own (B, NH) block, with no gather. The first operand's sharding of B and NH is
taken for every operand and result; the other axes are replicated (a kernel needs a whole sequence and whole head
dims). Unsharded and single-device calls run `fn` as it is. `vmap` folds the mapped axis into B (custom_partitioning
has no batching rule of its own).

Triton's CPU interpreter (tests) runs kernels in host callbacks, which this JAX cannot keep alive inside a
custom-partitioned body (the process segfaults); in interpreter mode `fn` therefore runs unwrapped, and sharded
Triton calls are gathered there as before.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from xlstm_jax.kernels.launch import interpret_mode


def _rule(*args):
    """The Shardy rule: factors b and h shared by every operand and result; every other axis is its own factor and
    stays replicated. Called as (*static_args, mesh, operand_types, result_types)."""
    operand_types, result_types = args[-2], args[-1]
    free: list[str] = []

    def factors(types):
        out = []
        for t in types:
            rest = [f"x{len(free) + j}" for j in range(len(t.shape) - 2)]
            free.extend(rest)
            out.append(" ".join(["b", "h", *rest]))
        return ", ".join(out)

    rule = f"{factors(operand_types)} -> {factors(result_types)}"
    return rule, {"need_replication_factors": tuple(free)}


def _partitioned(fn: Callable, n_static: int) -> Callable:
    wrapped = custom_partitioning(fn, static_argnums=tuple(range(n_static)))

    def shardings(mesh, arg_shapes, result_shape):
        spec = tuple(getattr(arg_shapes[0].sharding, "spec", ())) + (None, None)
        sharding = NamedSharding(mesh, PartitionSpec(spec[0], spec[1]))
        return sharding, tuple(sharding for _ in result_shape)

    def infer(*args):
        return shardings(*args[n_static:])[1]

    def partition(*args):
        static, (mesh, arg_shapes, result_shape) = args[:n_static], args[n_static:]
        sharding, results = shardings(mesh, arg_shapes, result_shape)

        def local(*arrays):
            return fn(*static, *arrays)

        return mesh, local, results, tuple(sharding for _ in arg_shapes)

    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=_rule)
    return wrapped


def per_batch_head(fn: Callable, n_static: int = 0) -> Callable:
    """`fn(*static, *arrays) -> tuple of arrays` (the first `n_static` arguments hashable and static, every array
    leading with (B, NH)), partitioned over B and NH under jit."""
    partitioned = _partitioned(fn, n_static)

    def call(*args):
        if interpret_mode():
            return fn(*args)
        static, arrays = args[:n_static], args[n_static:]

        @jax.custom_batching.custom_vmap
        def run(*arrays):
            return partitioned(*static, *arrays)

        @run.def_vmap
        def fold(axis_size, in_batched, *arrays):
            arrays = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(arrays, in_batched)]
            out = call(*static, *(a.reshape(-1, *a.shape[2:]) for a in arrays))
            return tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in out), tuple(True for _ in out)

        return run(*arrays)

    return call
