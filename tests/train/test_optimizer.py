"""The training optimizer: its gradient clipping equals optax's (and takes a global norm computed once by the step),
its state has the structure of optax's clip + AdamW chain (checkpoints written before restore), and the train step
computes the gradients' global norm once for its finite check and the clip."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xlstm_jax.train.benchmark import synthetic_step
from xlstm_jax.train.config import TrainConfig
from xlstm_jax.train import steps
from xlstm_jax.train.steps import clip_by_global_norm, make_optimizer


def _grads(scale):
    keys = jax.random.split(jax.random.key(0), 2)
    return {"a": scale * jax.random.normal(keys[0], (3, 4)), "b": {"c": scale * jax.random.normal(keys[1], (5,))}}


@pytest.mark.parametrize("scale", [0.01, 10.0])  # below and above the clip
@pytest.mark.parametrize("given", [False, True])
def test_clip_equals_optax(scale, given):
    grads = _grads(scale)
    want, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    extra = {"grad_norm": optax.global_norm(grads)} if given else {}
    got, state = clip_by_global_norm(1.0).update(grads, optax.EmptyState(), **extra)
    assert state == optax.EmptyState()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
    assert (optax.global_norm(got) < 1.0 + 1e-5) and (scale > 1 or optax.global_norm(got) < 0.9)


def test_state_has_the_structure_of_optax_clip_and_adamw(monkeypatch):
    config, params = TrainConfig(steps=10), _grads(1.0)
    new_state = make_optimizer(config).init(params)
    monkeypatch.setattr(steps, "clip_by_global_norm", optax.clip_by_global_norm)  # the chain as it was
    assert jax.tree.structure(new_state) == jax.tree.structure(make_optimizer(config).init(params))


def test_the_train_step_takes_one_global_norm():
    step = synthetic_step("tiny", "native_chunkwise", 2, 32)
    jaxpr = jax.make_jaxpr(step.train_step)(*step.args)
    roots = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sqrt" and eqn.outvars[0].aval.shape == ():  # a norm's root (Adam's: arrays)
                roots.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert len(roots) == 1
    assert bool(step.run()[4])  # and the step runs, finite
