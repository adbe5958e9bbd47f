"""Packed documents, `xlstm_jax.mlstm(..., segment_ids=...)`: every backend equals running each document on its own
from a zero state (the first from the initial states) in float64, for outputs, last states and the gradients of
every input and the initial states; boundaries at chunk starts, inside chunks and one-token documents; the sequence
split over devices; bad segment ids."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.devices import run_on_devices
from xlstm_jax import mlstm
from xlstm_jax.mlstm.reference import mlstm_recurrent_reference
from xlstm_jax.mlstm.segments import from_cu_seqlens

B, NH, S, DHQK, DHHV = 2, 2, 40, 8, 16
BACKENDS = [("native_parallel", None), ("native_recurrent", None), ("native_chunkwise", 16),
            ("triton_limit_chunk", 16), ("triton_xl_chunk", 16)]


def _random_layout(seed: int) -> tuple[list[int], list[int]]:
    """Two rows of document lengths summing to S, half of them one-token documents (runs of adjacent starts)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        lengths = []
        while sum(lengths) < S:
            lengths.append(1 if rng.random() < 0.5 else int(rng.integers(2, 12)))
        lengths[-1] -= sum(lengths) - S
        rows.append([n for n in lengths if n > 0])
    return tuple(rows)


# Document lengths per row (chunks of 16). Each -inf forget gate at a start adds the log-gate floor to the chunk's
# cumulative sums: runs of starts in one chunk sum several floors.
LAYOUTS = {
    # row 0: boundaries inside chunks (7, 23) and at a chunk start (32); row 1: a one-token document (16) at a chunk
    # start, then a boundary inside the last chunk (39: a one-token last document)
    "inside_and_at_chunk_starts": ([7, 16, 9, 8], [16, 1, 22, 1]),
    # row 0: one-token documents at position 0 and at S - 1, and three starts in a row across a chunk border (15-18);
    # row 1: four starts in a row inside a chunk (the layouts of issue 31)
    "adjacent_starts_and_edges": ([1, 14, 1, 1, 1, 21, 1], [10, 1, 1, 1, 27]),
    # row 0: a whole chunk of one-token documents (16 starts in a row); row 1: random, half one-token documents
    "a_chunk_of_starts_and_random": ([1] * 16 + [24], _random_layout(1)[1]),
}


def _segment_ids(lengths) -> np.ndarray:
    return np.stack([np.repeat(np.arange(len(row)), row) + 100 * r for r, row in enumerate(lengths)]).astype(np.int32)


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, NH, S, DHQK)) for _ in range(2))
    v = rng.standard_normal((B, NH, S, DHHV))
    i = rng.standard_normal((B, NH, S)) * 2
    f = rng.standard_normal((B, NH, S)) * 2 + 1
    c = rng.standard_normal((B, NH, DHQK, DHHV))
    n = rng.standard_normal((B, NH, DHQK))
    m = rng.standard_normal((B, NH))
    return [np.asarray(x, np.float32) for x in (q, k, v, i, f, c, n, m)]


def _weights(seed: int):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, NH, S, DHHV)), rng.standard_normal((B, NH, DHQK, DHHV)),
            rng.standard_normal((B, NH, DHQK)))


def _loss(h, states, weights):
    """A loss of h and the true (unstabilised) last states C e^m, n e^m: the stabiliser m of a document's first
    step is a representation choice, the true states are not."""
    c, n, m = states
    w_h, w_c, w_n = weights
    scale = jnp.exp(m)
    return jnp.sum(h * w_h) + jnp.sum(c * scale[..., None, None] * w_c) + jnp.sum(n * scale[..., None] * w_n)


_document = jax.jit(mlstm_recurrent_reference)  # compiled once per document length, not once per document


def _separately(layout, q, k, v, i, f, c, n, m):
    """float64: every document of every row alone, the first from the initial states; h and the last states."""
    hs, lasts = [], []
    for r, lengths in enumerate(layout):
        start, state, parts = 0, (c[r:r + 1], n[r:r + 1], m[r:r + 1]), []
        for number, length in enumerate(lengths):
            piece = [x[r:r + 1, :, start:start + length] for x in (q, k, v, i, f)]
            h, state = _document(*piece, *(state if number == 0 else (None, None, None)))
            parts.append(h)
            start += length
        hs.append(jnp.concatenate(parts, axis=2))
        lasts.append(state)
    return jnp.concatenate(hs), tuple(jnp.concatenate([s[j] for s in lasts]) for j in range(3))


# The Triton kernels run in the interpreter on a CPU (slow): the two layouts with runs of starts, which cover the
# first one's boundaries too (inside chunks, at a chunk start, a one-token last document).
CASES = [(backend, chunk, layout) for backend, chunk in BACKENDS for layout in LAYOUTS
         if not (backend.startswith("triton") and layout == "inside_and_at_chunk_starts")]


@functools.cache
def _reference(layout_name: str):
    """The float64 reference of a layout, once per process (every backend compares with it): h, the true last
    states C·e^m and n·e^m, and the gradients of the loss with respect to q, k, v, i, f, c, n, m."""
    args, weights, layout = _inputs(0), _weights(1), LAYOUTS[layout_name]
    with jax.enable_x64(True):
        def reference(*a):
            h, states = _separately(layout, *a)
            return _loss(h, states, tuple(jnp.asarray(w, jnp.float64) for w in weights)), (h, states)

        (_, (want_h, want_states)), want_grads = jax.value_and_grad(reference, argnums=tuple(range(8)),
                                                                    has_aux=True)(*(np.float64(a) for a in args))
        c, n, m = (np.asarray(s) for s in want_states)
        return np.asarray(want_h), [c * np.exp(m)[..., None, None], n * np.exp(m)[..., None]], [
            np.asarray(g) for g in want_grads]


@pytest.mark.slow
@pytest.mark.parametrize("backend, chunk_size, layout", CASES)
def test_packed_rows_equal_separate_documents(backend, chunk_size, layout):
    args, weights = _inputs(0), _weights(1)
    want_h, want_true, want_grads = _reference(layout)
    layout = LAYOUTS[layout]
    assert all(sum(row) == S and min(row) >= 1 for row in layout)
    seg = jnp.asarray(_segment_ids(layout))

    def ours(q, k, v, i, f, c, n, m):
        h, states = mlstm(q, k, v, i, f, c_initial=c, n_initial=n, m_initial=m, backend=backend,
                          chunk_size=chunk_size, return_last_states=True, segment_ids=seg)
        return _loss(h, states, weights), (h, states)

    (_, (h, states)), grads = jax.jit(jax.value_and_grad(ours, argnums=tuple(range(8)), has_aux=True))(*args)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)

    assert rel(h, want_h) < 2e-5
    c, n, m = (np.asarray(s, np.float64) for s in states)
    assert rel(c * np.exp(m)[..., None, None], want_true[0]) < 2e-5
    assert rel(n * np.exp(m)[..., None], want_true[1]) < 2e-5
    for name, g, want in zip(("q", "k", "v", "i", "f", "c", "n", "m"), grads, want_grads):
        assert np.all(np.isfinite(np.asarray(g))), name
        assert rel(g, want) < 1e-4, (name, rel(g, want))


@pytest.mark.slow
def test_without_boundaries_segment_ids_change_nothing():
    args = _inputs(2)
    same = jnp.zeros((B, S), jnp.int32)
    plain = mlstm(*args[:5], backend="native_chunkwise", chunk_size=16)
    assert np.array_equal(mlstm(*args[:5], backend="native_chunkwise", chunk_size=16, segment_ids=same), plain)


def test_bad_segment_ids_get_clear_errors():
    args = _inputs(3)[:5]
    with pytest.raises(ValueError, match=r"segment_ids must be \(B, S\) = \(2, 40\)"):
        mlstm(*args, segment_ids=jnp.zeros((2, 39), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
        mlstm(*args, segment_ids=jnp.zeros((2, 40), jnp.float32))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        mlstm(*args, segment_ids=[[0] * 40] * 2)


def test_cu_seqlens_convert_to_segment_ids():
    assert from_cu_seqlens([0, 3, 4, 7], 7).tolist() == [[0, 0, 0, 1, 2, 2, 2]]
    with pytest.raises(ValueError, match="cu_seqlens must rise strictly from 0 to S = 7"):
        from_cu_seqlens([0, 3, 3, 7], 7)


@pytest.mark.slow
def test_documents_across_shards_of_a_split_sequence():
    """The sequence split over 4 devices (context parallelism), boundaries at and inside shards: the gradients of
    q, k, v, i, f equal the one-device call's, for both combines (a document start's -inf gate inside a shard that
    is not the last one needs the shard summary's exact suffix sums)."""
    run_on_devices("segments_across_shards.py", 4, oks=2)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["eight_documents", "dense_random"])
@pytest.mark.parametrize("backend", ["triton_limit_chunk", "triton_xl_chunk"])
def test_gpu_packed_rows_at_a_realistic_shape(backend, layout):
    """B=2, NH=4, 128/256, float32: 8 documents of uneven lengths per row at S=4096, or at S=1024 a new document
    with probability 0.1 at each token (runs of adjacent starts: the layout that was off by 2.78 on the GPU before
    issue 31's fix); h and the true last states against each document run alone in float64; all gradients at
    S=1024 against native_chunkwise."""
    rng = np.random.default_rng(5)
    Bg, NHg, Sg, DK, DV = 2, 4, 4096 if layout == "eight_documents" else 1024, 128, 256
    q, k = (rng.standard_normal((Bg, NHg, Sg, DK)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((Bg, NHg, Sg, DV)).astype(np.float32)
    i, f = (rng.standard_normal((Bg, NHg, Sg)).astype(np.float32) * 2 + s for s in (0.0, 3.0))
    if layout == "eight_documents":
        cuts = np.sort(rng.choice(np.arange(1, Sg), size=7, replace=False))
    else:
        cuts = np.nonzero(rng.random(Sg) < 0.1)[0]
        cuts = cuts[cuts > 0]
    seg = np.broadcast_to(np.searchsorted(cuts, np.arange(Sg), side="right"), (Bg, Sg)).astype(np.int32)
    h, (c, n, m) = mlstm(q, k, v, i, f, backend=backend, segment_ids=seg, return_last_states=True)
    with jax.enable_x64(True):
        parts, state = [], None
        for a, b in zip([0, *cuts], [*cuts, Sg]):
            out, state = mlstm_recurrent_reference(*(np.float64(x[:, :, a:b]) for x in (q, k, v, i, f)))
            parts.append(np.asarray(out))
        want_h = np.concatenate(parts, axis=2)
        scale = np.exp(np.asarray(state[2]))
        want_c, want_n = np.asarray(state[0]) * scale[..., None, None], np.asarray(state[1]) * scale[..., None]
    m = np.asarray(m, np.float64)
    assert np.max(np.abs(np.asarray(h) - want_h)) / np.max(np.abs(want_h)) < 1e-4
    assert np.max(np.abs(np.asarray(c) * np.exp(m)[..., None, None] - want_c)) / np.max(np.abs(want_c)) < 1e-4
    assert np.max(np.abs(np.asarray(n) * np.exp(m)[..., None] - want_n)) / np.max(np.abs(want_n)) < 1e-4

    short = [x[:, :, :1024] for x in (q, k, v, i, f)]
    w = rng.standard_normal((Bg, NHg, 1024, DV)).astype(np.float32)

    def grads(name):
        loss = lambda *a: jnp.sum(mlstm(*a, backend=name, segment_ids=seg[:, :1024]) * w)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*short)

    for got, want in zip(grads(backend), grads("native_chunkwise")):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.all(np.isfinite(got)) and np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-3
