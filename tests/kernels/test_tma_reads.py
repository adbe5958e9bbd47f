"""Token tiles read through TMA tensor descriptors: the state recurrences' (k, v forward; q, dh backward; launch
table field recurrent.tma) and the limit family's per-chunk kernels' (q, k, v, dh; limit.tma). Through Triton's
interpreter on CPU against the float64 reference (outputs, last states, gradients of all eight inputs) where the
head dims end inside a tile (the descriptor reads zeros past them) and with sequence groups; which rows may take
descriptors on a GPU; and on the GPU at the 16-head and 7B head dims, also inside the CUDA graphs XLA records."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from tests.support.helpers import (
    assert_matches_reference,
    make_inputs,
    make_weights,
    outputs_and_grads,
    reference_outputs_and_grads,
    triton_core_fn,
)
from xlstm_jax.kernels.triton import core as triton_core
from xlstm_jax.kernels.triton import families as triton_families

pytestmark = pytest.mark.slow  # the Triton kernels through the interpreter


@pytest.mark.parametrize("family, programs", [("limit", 1), ("limit", 8), ("xl", 1)])
def test_descriptor_reads_match_the_float64_reference(family, programs):
    """DHQK = 24 and DHHV = 40 in 16-wide tiles (the last tile of each half outside the head dims); programs 8:
    four sequence groups of the 250-token (16-chunk) sequence."""
    x = make_inputs(11, 1, 2, 250, 24, 40, with_state=True)
    w = make_weights(11, x)
    cfg = triton_families.config(family, 16 if family == "limit" else 32, "float32",
                                 **({"tiles": (16, 16, 16)} if family == "xl" else {}))
    cfg = cfg.with_launch({"recurrent.tma": 1, "recurrent.block": 16, "recurrent.programs": programs})
    out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=2e-5, bw_tol=1e-4)


@pytest.mark.parametrize("recurrent_tma", [0, 1])
def test_limit_chunk_descriptor_reads_match_the_float64_reference(recurrent_tma):
    """limit.tma: the forward output, dq and dk/dv kernels read q, k, v and dh through descriptors. DHQK = 24 and
    DHHV = 40 in 16-wide tiles (the last tile of each half outside the head dims), 250 tokens in chunks of 16."""
    x = make_inputs(13, 1, 2, 250, 24, 40, with_state=True)
    w = make_weights(13, x)
    cfg = triton_families.config("limit", 16, "float32").with_launch(
        {"limit.tma": 1, "limit.block": 16, "limit.out_v_block": 16, "recurrent.tma": recurrent_tma,
         "recurrent.block": 16})
    out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=2e-5, bw_tol=1e-4)


def test_rows_take_descriptors_only_at_16_byte_strides():
    """A descriptor's rows must start at multiples of 16 bytes: bf16 rows of 24 elements (48 bytes) may, of 20 (40
    bytes) may not; float32 rows of 20 (80 bytes) may. Each row operand gets an (L, columns) tile, in input order;
    the launch table's flag off gives none, nor do rows past int32 coordinates."""
    rows = lambda d, dtype: jnp.zeros((2, 32, d), dtype)  # noqa: E731
    assert triton_core.token_descriptors(1, 16, (rows(24, jnp.bfloat16), rows(64, jnp.bfloat16)), (8, 32)) == {
        0: (16, 8), 1: (16, 32)}
    assert triton_core.token_descriptors(1, 16, (rows(24, jnp.bfloat16), rows(20, jnp.bfloat16)), (8, 32)) == {}
    assert triton_core.token_descriptors(1, 16, (rows(20, jnp.float32),), (16,)) == {0: (16, 16)}
    assert triton_core.token_descriptors(0, 16, (rows(20, jnp.float32),), (16,)) == {}
    # 2^31 token rows overflow a descriptor's int32 row coordinate: pointer loads (int64 offsets) take them
    huge = jax.ShapeDtypeStruct((2**16, 2**15, 64), jnp.bfloat16)
    assert triton_core.token_descriptors(1, 64, (huge,), (64,)) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("family, launch", [("limit", {"recurrent.tma": 1}), ("xl", {"recurrent.tma": 1}),
                                            ("limit", {"limit.tma": 1}),
                                            ("limit", {"recurrent.tma": 1, "limit.tma": 1})])
@pytest.mark.parametrize("DHQK, DHHV", [(128, 256), (256, 512)])
def test_descriptor_reads_on_gpu_match_the_float64_reference(family, launch, DHQK, DHHV):
    """float32 at the 16-head and 7B head dims, 1,024 tokens in four sequence groups: outputs, last states and every
    gradient as tight as the pointer loads' GPU parity tests."""
    x = make_inputs(12, 1, 2, 1024, DHQK, DHHV, with_state=True)
    w = make_weights(12, x)
    cfg = triton_families.config(family, 64, "float32").with_launch({**launch, "recurrent.programs": 64})
    out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=1e-4, bw_tol=1e-3)


# Runs in its own process: XLA's command-buffer flags must be set before jax starts.
_IN_GRAPHS = textwrap.dedent("""
    import numpy as np
    from tests.support.helpers import make_inputs, make_weights, outputs_and_grads, triton_core_fn
    from xlstm_jax.kernels.launch import tma_available
    from xlstm_jax.kernels.triton import families

    assert tma_available(), "no host-made TMA descriptors with this jaxlib and jax-triton"
    x = make_inputs(14, 2, 4, 1024, 128, 256, dtype="bfloat16", with_state=True)
    w = make_weights(14, x)
    runs = []
    for tma in (0, 1):
        cfg = families.config("limit", 64, "bfloat16").with_launch({"limit.tma": tma, "recurrent.tma": tma})
        out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
        runs.append([np.asarray(a, np.float32) for a in (out[0], *out[1], *grads.values())])
    for pointer, descriptor in zip(*runs):
        np.testing.assert_allclose(descriptor, pointer, rtol=2e-2, atol=2e-2)
""")


@pytest.mark.gpu
def test_gpu_descriptor_reads_run_inside_xla_command_buffers():
    """With every custom call recorded into XLA's CUDA graphs (graphs of one command allowed), the forward and
    backward with descriptor reads in all four kernel kinds run and agree with pointer loads (bf16, 16-head dims).
    Descriptors the kernels made on the device failed there: jaxlib allocates their scratch with cuMemAllocAsync at
    each launch, which a graph XLA nests cannot hold (CUDA_ERROR_NOT_SUPPORTED); the launch layer now makes them on
    the host."""
    flags = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", _IN_GRAPHS], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
