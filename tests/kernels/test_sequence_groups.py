"""Sequence groups (kernels/triton/sequence_groups.py): the Triton state recurrences split one long
sequence into groups of chunks walked at once, from incoming states combined by summaries, and must give the single
walk's result. CPU, both Triton families through the interpreter, against the float64 reference (outputs, last states,
gradients of all eight inputs) and against the single walk with document resets at and inside group borders."""

import numpy as np
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
from xlstm_jax.kernels.triton import sequence_groups

pytestmark = pytest.mark.slow  # the Triton kernels through the interpreter: 8-20 s each


def _config(family: str, groups: int, **kw):
    """A 16-token-chunk call whose recurrences run in `groups` groups at the test shapes (B·NH·tiles = 2)."""
    cfg = triton_families.config(family, 16 if family == "limit" else 32, "float32", **kw)
    return cfg.with_launch({"recurrent.programs": 2 * groups})


def test_the_number_of_groups():
    assert sequence_groups.num_groups(1024, 64, 1024) == 1  # enough programs: one walk
    assert sequence_groups.num_groups(128, 1024, 1024) == 8
    assert sequence_groups.num_groups(128, 1024, 1000) == 8  # the smallest power of two reaching the target
    assert sequence_groups.num_groups(1, 16, 1024) == 4  # groups keep MIN_GROUP_CHUNKS chunks
    assert sequence_groups.num_groups(1, 12, 1024) == 2  # and divide the chunk count
    assert sequence_groups.num_groups(1, 7, 1024) == 1


@pytest.mark.parametrize("family, groups", [("limit", 2), ("limit", 4), ("xl", 4)])
def test_groups_match_the_float64_reference(family, groups):
    """S = 250 pads to 16 chunks of 16 (the xl family: 8 chunks of 32, recurrence sub-chunks of 16)."""
    x = make_inputs(groups, 1, 2, 250, 16, 24, with_state=True)
    w = make_weights(groups, x)
    cfg = _config(family, groups, **({"tiles": (16, 16, 16)} if family == "xl" else {}))
    assert sequence_groups.num_groups(2, 16, cfg.launch[0][1]) == groups
    out, grads = outputs_and_grads(triton_core_fn(cfg), x, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(x, w), fw_tol=2e-5, bw_tol=1e-4)


def test_document_resets_at_and_inside_group_borders_match_the_single_walk():
    """f = -inf (the exact reset of segment ids) at a group border (64), inside a chunk of the next group (70, 71:
    a one-token document), in the last group, and a long decay before the first; 4 groups of 4 chunks."""
    x = make_inputs(7, 1, 2, 256, 16, 24, with_state=True, fgate=(-2.0, 8.0))
    x["f"][:, :, [64, 70, 71, 200]] = -np.inf
    x["i"][:, :, 140:150] = -np.inf  # a stretch that writes nothing
    w = make_weights(7, x)
    grouped = outputs_and_grads(triton_core_fn(_config("limit", 4)), x, w)
    single = outputs_and_grads(triton_core_fn(_config("limit", 1)), x, w)
    assert_matches_reference(*grouped, *single, fw_tol=1e-5, bw_tol=1e-5)
    for name, g in grouped[1].items():
        assert np.all(np.isfinite(g)), name


def test_a_group_without_input_and_padding_to_the_chunk():
    """Every input gate of the second half is -inf (its groups write nothing: their M is floored) and S = 200 pads
    with neutral steps; outputs, states and gradients as the float64 reference."""
    x = make_inputs(9, 1, 2, 200, 16, 16, with_state=True)
    x["i"][:, :, 100:] = -np.inf
    w = make_weights(9, x)
    out, grads = outputs_and_grads(triton_core_fn(_config("limit", 4)), x, w)
    ref_out, ref_grads = reference_outputs_and_grads(x, w)
    ref_grads["i"] = np.where(np.isfinite(x["i"]), ref_grads["i"], 0.0)
    assert_matches_reference(out, grads, ref_out, ref_grads, fw_tol=2e-5, bw_tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["limit", "xl"])
def test_gpu_one_long_sequence_matches_the_float64_reference(family):
    """B = 1 at realistic head dims: the table's recurrent.programs split the recurrences into groups (asserted);
    outputs and last states at S = 16384, and every gradient at S = 2048, in float32."""
    cfg = triton_families.config(family, 64 if family == "limit" else 128, "float32")
    p = triton_core.launch_params(128, 256, cfg)["recurrent"]
    x = make_inputs(11, 1, 2, 16384, 128, 256, with_state=True)
    assert sequence_groups.num_groups(2 * 8, 16384 // cfg.recurrent_chunk, p.programs) > 1
    out, _ = outputs_and_grads(triton_core_fn(cfg), x)
    assert_matches_reference(out, None, reference_outputs_and_grads(x)[0], None, fw_tol=1e-4, bw_tol=0)
    small = {k: v[:, :, :2048] if v.ndim >= 3 and v.shape[2] == 16384 else v for k, v in x.items()}
    w = make_weights(11, small)
    out, grads = outputs_and_grads(triton_core_fn(cfg), small, w)
    assert_matches_reference(out, grads, *reference_outputs_and_grads(small, w), fw_tol=1e-4, bw_tol=1e-3)
