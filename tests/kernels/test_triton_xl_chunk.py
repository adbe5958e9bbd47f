"""TFLA xl-chunk Triton kernels (the documented _parallel_fw module and the `triton_xl_chunk` backend).

CPU: the real kernels through Triton's interpreter at small shapes and several tilings; `gpu`: realistic shapes.
Compared with the float64 reference on outputs, last states and the gradients of all eight inputs.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.helpers import (
    assert_matches_reference,
    assert_normalized_loss_grads_match,
    assert_rel_close,
    make_inputs,
    make_weights,
    native_chunkwise,
    output_and_grad_dtypes,
    outputs_and_grads,
    reference_outputs_and_grads,
    triton_core_fn,
    xl_chunk,
)
from xlstm_jax.kernels.triton import launch_table, families as triton_families
from xlstm_jax.kernels.mlstm_chunkwise.max_triton_fwbw_v5xlchunksize._parallel_fw import (
    mlstm_chunkwise__parallel_fw_Hintra,
)


def _xl(**kw):
    return lambda **a: xl_chunk(**a, return_last_states=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(
    "S, DHQK, DHHV, tiling, with_state",
    [
        (70, 16, 32, dict(chunk_size=64, inter_chunk_size=16, tile_q=32, tile_kv=16), True),  # S % chunk != 0
        (40, 24, 40, dict(chunk_size=32, inter_chunk_size=16, tile_q=16, tile_kv=32), False),  # tile_kv > tile_q
        (64, 16, 16, dict(chunk_size=64, inter_chunk_size=32, tile_q=64, tile_kv=64), True),  # one tile per chunk
        (5, 16, 16, dict(chunk_size=16), True),  # S < chunk
    ],
)
def test_matches_float64_reference(S, DHQK, DHHV, tiling, with_state):
    x = make_inputs(0, 1, 2, S, DHQK, DHHV, with_state=with_state)
    w = make_weights(0, x)
    out, grads = outputs_and_grads(_xl(**tiling), x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w)
    assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=2e-5, bw_tol=1e-4)


@pytest.mark.slow
def test_matches_native_chunkwise():
    """The same call through `native_chunkwise` (XLA, its own chunking) agrees on outputs, last states and the
    gradients of all eight inputs; S is not a multiple of either chunk size."""
    x = make_inputs(5, 1, 2, 90, 32, 48, with_state=True)
    w = make_weights(5, x)
    out, grads = outputs_and_grads(_xl(chunk_size=64, inter_chunk_size=32, tile_q=32, tile_kv=16), x, w)
    native = outputs_and_grads(lambda **a: native_chunkwise(**a, return_last_states=True, chunk_size=16), x, w)
    assert_matches_reference(out, grads, *native, fw_tol=2e-5, bw_tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute(dtype):
    """bf16 / fp16 q/k/v computed in their own dtype (matmul operands, chunk states, state cotangents, gradients
    written in that dtype)."""
    x = make_inputs(2, 1, 2, 48, 32, 32, dtype=dtype, with_state=True)
    w = make_weights(2, x)
    fn = _xl(chunk_size=32, inter_chunk_size=16, tile_q=16, tile_kv=16)
    assert output_and_grad_dtypes(fn, x) == (jnp.dtype(dtype),) * 4
    out, grads = outputs_and_grads(fn, x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=1e-2, bw_tol=2e-2)


@pytest.mark.slow
def test_backward_column_blocks_of_every_width():
    """dq, dk, dv split into different numbers of output column blocks, the last ones partly masked."""
    cfg = triton_families.config("xl", 32, "float32", (16, 16, None)).with_launch(
        {"xl.dq_block": 16, "xl.dk_block": 32, "xl.dv_block": 16})
    x = make_inputs(3, 1, 2, 40, 48, 40, with_state=True)
    w = make_weights(3, x)
    out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=2e-5, bw_tol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["sm90/dh<=256", "sm90/dh>256"])
@pytest.mark.parametrize("DHQK, DHHV", [(1024, 48), (48, 1024)])
def test_head_dims_up_to_1024(DHQK, DHHV, entry):
    """Head dims up to 1024 (the key and the value axis tiled in blocks), with the launch parameters of each
    checked-in table entry (their output column tiles differ)."""
    sections = launch_table.load_table()["entries"][entry]
    params = {f"{name}.{field}": value for name in ("recurrent", "xl") for field, value in sections[name].items()}
    cfg = triton_families.config("xl", 16, "float32").with_launch(params)
    x = make_inputs(4, 1, 1, 20, DHQK, DHHV, with_state=True)
    w = make_weights(4, x)
    out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=1e-4, bw_tol=1e-3)


def test_head_dims_above_1024_are_refused():
    x = make_inputs(0, 1, 1, 4, 1040, 16)
    with pytest.raises(ValueError, match=r"DHQK \(q, k last axis\) must be <= 1024"):
        xl_chunk(*(jnp.asarray(x[k]) for k in ("q", "k", "v", "i", "f")))


@pytest.mark.slow
def test_recompute_option_and_denominator_variant():
    x = make_inputs(1, 1, 1, 48, 16, 16, with_state=True)
    w = make_weights(1, x)
    variant = dict(norm_val=2.0, stabilize_correctly=True)
    out, grads = outputs_and_grads(_xl(chunk_size=32, tile_q=16, recompute_states_in_bw=False, **variant), x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w, **variant)
    assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=2e-5, bw_tol=1e-4)


@pytest.mark.slow
def test_seed_003_parallel_forward_matches_reference():
    B, NH, L, NC, DHQK, DHHV = 1, 2, 32, 3, 16, 32
    x = make_inputs(2, B, NH, NC * L, DHQK, DHHV)
    states = [(np.zeros((B, NH, DHQK, DHHV)), np.zeros((B, NH, DHQK)), np.zeros((B, NH)))]
    for kc in range(1, NC + 1):
        prefix = {n: a[:, :, : kc * L] for n, a in x.items()}
        states.append(reference_outputs_and_grads(prefix)[0][1])
    c_all = np.concatenate([s[0] for s in states], axis=2).astype(np.float32)
    n_all = np.concatenate([s[1] for s in states], axis=2).astype(np.float32)
    m_all = np.stack([s[2] for s in states], axis=-1).astype(np.float32)
    a = {n: jnp.asarray(v) for n, v in x.items()}
    h, norm, m = mlstm_chunkwise__parallel_fw_Hintra(
        a["q"], a["k"], a["v"], a["i"].reshape(B, NH, NC, L), a["f"], jnp.asarray(c_all), jnp.asarray(n_all),
        jnp.asarray(m_all), chunk_size=L, siz_b_LQ=16, siz_b_LKV=16,
    )
    ref_h = reference_outputs_and_grads(x)[0][0]
    assert h.shape == (B, NH, NC * L, DHHV) and norm.dtype == jnp.float32 and m.shape == (B, NH, NC * L)
    assert_rel_close(h, ref_h, 2e-5, "H")
    assert np.all(np.asarray(norm) > 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(siz_b_LQ=24), "siz_b_LQ"),
        (dict(siz_b_LKV=128), "siz_b_LKV"),
        (dict(siz_b_DHQK=8), "siz_b_DHQK"),
        (dict(chunk_size=48), "chunk_size"),
    ],
)
def test_seed_003_rejects_bad_blocks(kwargs, match):
    B, NH, S, D = 1, 1, 64, 16
    z = jnp.zeros((B, NH, S, D))
    args = (z, z, z, jnp.zeros((B, NH, S)), jnp.zeros((B, NH, S)), jnp.zeros((B, NH, 2 * D, D)),
            jnp.zeros((B, NH, 2 * D)), jnp.zeros((B, NH, 2)))
    with pytest.raises(ValueError, match=match):
        mlstm_chunkwise__parallel_fw_Hintra(*args, **{"chunk_size": 64, **kwargs})


@pytest.mark.parametrize("kwargs, match", [(dict(chunk_size=4096), "chunk_size"), (dict(tile_q=8), "tile_q"),
                                           (dict(chunk_size=32, tile_kv=64), "tile_kv")])
def test_bad_tiling_is_refused(kwargs, match):
    x = make_inputs(0, 1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=match):
        xl_chunk(*(jnp.asarray(x[k]) for k in ("q", "k", "v", "i", "f")), **kwargs)


# --------------------------------------------------------------------------------------------- GPU (CUDA) tests
@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [64, 128, 256, 512, 1024])
@pytest.mark.parametrize("DHQK, DHHV", [(128, 256), (256, 512)])
def test_gpu_parity_realistic_shapes(chunk_size, DHQK, DHHV):
    x = make_inputs(0, 1, 2, 2048, DHQK, DHHV, with_state=True)
    w = make_weights(0, x)
    out, grads = outputs_and_grads(_xl(chunk_size=chunk_size), x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w)
    assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=1e-4, bw_tol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("DHQK, DHHV", [(128, 256), (256, 512)])
def test_gpu_parity_half_precision_compute(DHQK, DHHV, dtype):
    """bf16 / fp16 inputs computed in their dtype (bf16 is the benchmarked configuration): outputs against the
    float64 reference at S=4096, gradients under the per-head-normalized loss at S=1024."""
    x = make_inputs(0, 2, 4, 4096, DHQK, DHHV, dtype=dtype, with_state=True)
    out, _ = outputs_and_grads(_xl(chunk_size=128), x)
    assert_matches_reference(out, None, *reference_outputs_and_grads(x), fw_tol=1e-2, bw_tol=5e-2)
    small = {k: v[:, :, :1024] if v.ndim >= 3 and v.shape[2] == 4096 else v for k, v in x.items()}
    assert_normalized_loss_grads_match(_xl(chunk_size=128), small, make_weights(0, small)["h"], 5e-2)


@pytest.mark.gpu
def test_gpu_parity_largest_head_dims():
    """1024 x 1024 heads, 4 chunks (the float64 reference keeps a 1024 x 1024 state per step for its gradient; at
    S=1024, before the reference rematerialized its steps, it ran out of memory after other GPU tests)."""
    x = make_inputs(1, 1, 2, 512, 1024, 1024, with_state=True)
    w = make_weights(1, x)
    out, grads = outputs_and_grads(_xl(chunk_size=128), x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w)
    assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=1e-4, bw_tol=1e-3)
