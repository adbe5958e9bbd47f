"""The training step's `--loss fused`, `--remat` and `--weight-mode fused` choices compute the same loss and
gradients as the plain, remat-free, single-weight step on a tiny model; the choices are checked, and a stored run's
old boolean `remat` still resumes."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from rich.console import Console

from xlstm_jax import cli
from xlstm_jax.models.xlstm_large import xLSTMLarge
from xlstm_jax.models.xlstm_large.checkpoint import load_state_dict, state_dict
from xlstm_jax.train import loop
from xlstm_jax.train.config import ConfigError, TrainConfig
from xlstm_jax.train.steps import batch_sums, build_steps

TINY = dict(vocab_size=23, seq_len=16, num_kv_pairs=2, embedding_dim=32, num_heads=2, num_blocks=1, batch_size=3,
            chunk_size=16, backend="native_chunkwise", steps=4, warmup_steps=1, progress=False)


# an "optimizer" that leaves the parameters and keeps the gradient as its state: the step then returns it
KEEP_GRADS = optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                          lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads),
                                                                            grads))


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, params, a batch with padding and two documents in two of its rows, the plain step's loss,
    accuracy and gradients) of a tiny float32 model."""
    config = TrainConfig(**TINY)
    graphdef, params = nnx.split(xLSTMLarge(config.model_config(), rngs=nnx.Rngs(0)))
    keys = jax.random.split(jax.random.key(1), 2)
    tokens = jax.random.randint(keys[0], (3, 17), 0, 23)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": (jnp.arange(16)[None, :] >= jnp.array([[5], [9], [16]])).astype(jnp.int32),
             "mask": (jax.random.uniform(keys[1], (3, 16)) > 0.25).astype(jnp.float32)}
    return graphdef, params, batch, _step(graphdef, params, batch, "plain", "none")


def _step(graphdef, params, batch, loss, remat):
    """(loss, accuracy, gradients) of the training step with this loss and remat choice."""
    train_step = build_steps(graphdef, KEEP_GRADS, None, remat, loss, loss_block=8)[0]  # 23 columns: 3 blocks
    params = jax.tree.map(jnp.copy, params)  # the step donates its parameters; the fixture's are shared
    _, grads, value, acc, finite = train_step(params, KEEP_GRADS.init(params), batch)
    assert bool(finite)
    return float(value), float(acc), grads


@pytest.mark.slow
@pytest.mark.parametrize("loss, remat", [("plain", "block"), ("fused", "dots")])
def test_fused_loss_and_remat_give_the_plain_loss_and_gradients(tiny, loss, remat):
    graphdef, params, batch, (want, want_acc, want_grads) = tiny
    value, acc, grads = _step(graphdef, params, batch, loss, remat)
    assert acc == want_acc and value == pytest.approx(want, rel=1e-6)
    scale = max(float(np.max(np.abs(e))) for e in jax.tree.leaves(want_grads))  # gate biases' cancel to ~1e-5
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_fused_weight_mode_gives_the_single_loss_and_gradients(tiny):
    """The same parameters in the fused layout (q|k|v|o, i|f, gate|up each one matmul): the same loss, and each
    fused kernel's gradient is the single kernels' gradients side by side."""
    graphdef, params, batch, (want, want_acc, want_grads) = tiny
    config = TrainConfig(**TINY, weight_mode="fused").model_config()
    assert config.weight_mode == "fused"
    model = load_state_dict(config, state_dict(nnx.merge(graphdef, params), "hf"), "hf")
    fused_graphdef, fused_params = nnx.split(model)
    value, acc, grads = _step(fused_graphdef, fused_params, batch, "plain", "none")
    assert acc == want_acc and value == pytest.approx(want, rel=1e-6)
    want_model, got_model = nnx.merge(graphdef, want_grads), nnx.merge(fused_graphdef, grads)
    want_fused = state_dict(load_state_dict(config, state_dict(want_model, "hf"), "hf"), "hf")
    got = state_dict(got_model, "hf")
    assert sorted(got) == sorted(want_fused)
    scale = max(float(np.max(np.abs(e))) for e in want_fused.values())
    for key, g in got.items():
        np.testing.assert_allclose(g, want_fused[key], rtol=1e-5, atol=1e-6 * scale, err_msg=key)


def test_remat_choices_set_the_checkpoint_policy(tiny):
    graphdef, params, batch, _ = tiny
    sums = batch_sums(graphdef, None)
    policies = {remat: re.findall(r"policy=(\S+)", str(jax.make_jaxpr(lambda p, r=remat: sums(p, batch, r))(params)))
                for remat in ("none", "block", "dots", True, False)}
    assert policies == {"none": [], "block": ["None"], "dots": ["DotsSaveable(only_if_no_batch_dims=True)"],
                        True: ["None"], False: []}
    model = nnx.merge(graphdef, params)
    with pytest.raises(ValueError, match="remat must be one of"):
        model(batch["inputs"], remat="all")


def test_old_boolean_remat_settings_still_load_and_resume_quietly(tmp_path):
    assert TrainConfig(**TINY, remat=True).remat == "block" and TrainConfig(**TINY, remat=False).remat == "none"
    for name, value in (("remat", "all"), ("loss", "chunked")):
        with pytest.raises(ConfigError) as err:
            TrainConfig(**TINY, **{name: value})
        assert err.value.field == name
    stored = {**TrainConfig(**TINY).to_dict(), "remat": True}
    del stored["loss"]  # a run from before the loss choice
    (tmp_path / "train_config.json").write_text(json.dumps(stored))
    config = TrainConfig.resumed(str(tmp_path))
    assert (config.remat, config.loss) == ("block", "plain")
    console = Console(record=True, width=200)
    assert loop._check_output_dir(config, console)["remat"] == "block"
    assert "execution settings" not in console.export_text()
    loop._check_output_dir(TrainConfig.resumed(str(tmp_path), remat="dots", loss="fused"), console)
    assert console.export_text().strip().endswith("remat 'block' -> 'dots'")  # loss was not stored: not compared


@pytest.mark.parametrize("argv, reason", [(["--remat", "some"], "must be one of none, block, dots"),
                                          (["--loss", "blocked"], "must be one of plain, fused"),
                                          (["--weight-mode", "joined"], "must be one of single, fused")])
def test_bad_remat_loss_and_weight_mode_flags_are_one_error_line(argv, reason, capsys):
    assert cli.main(["train", "--steps", "3", "--warmup-steps", "1", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {argv[0]}: {reason}") and captured.err.count("\n") == 1
    assert captured.out == ""


def test_a_step_updates_in_place_and_a_non_finite_one_changes_nothing(tiny):
    """The step donates params and optimizer state; AdamW moves every parameter where the loss is finite, and
    where it is not (a NaN weight) returns params and optimizer state exactly as they came."""
    graphdef, params, batch, _ = tiny
    tx = optax.adamw(1e-2)
    train_step = build_steps(graphdef, tx, None, "none", "plain")[0]
    start = jax.tree.map(jnp.copy, params)
    new, opt_state, _, _, finite = train_step(jax.tree.map(jnp.copy, start), tx.init(start), batch)
    assert bool(finite)
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(start)))
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), start)
    before = [np.asarray(x) for x in jax.tree.leaves((poisoned, opt_state))]
    out = train_step(jax.tree.map(jnp.copy, poisoned), jax.tree.map(jnp.copy, opt_state), batch)
    assert not bool(out[4])
    for got, want in zip(jax.tree.leaves(out[:2]), before):
        np.testing.assert_array_equal(np.asarray(got), want)
