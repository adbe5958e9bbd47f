"""One training step's math: the optimizer, the masked loss, the jitted train and evaluation steps, and the model's
parameters initialised on a device mesh (`xlstm_jax.train.mesh`)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from xlstm_jax.models.xlstm_large.model import xLSTMLarge
from xlstm_jax.train.config import LOSS_CHOICES, TrainConfig
from xlstm_jax.train.losses import blocked_cross_entropy
from xlstm_jax.train.mesh import MLSTM_AXES, param_shardings


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio x peak at the end of the first of
    `config.schedule_segments()`; from the start of each later segment (a resume that changed `steps`), a new cosine
    from the rate reached there to the same floor at the segment's end: the rate never jumps."""
    floor = config.learning_rate * config.min_lr_ratio
    segments = config.schedule_segments()
    first_end = segments[0][1]
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=min(config.warmup_steps, first_end - 1),
        decay_steps=first_end, end_value=floor,
    )
    pieces, boundaries = [schedule], []
    for start, end in segments[1:]:
        reached = float(optax.join_schedules(pieces, boundaries)(start)) if boundaries else float(schedule(start))
        if reached > floor:
            piece = optax.cosine_decay_schedule(reached, decay_steps=end - start, alpha=floor / reached)
        else:
            piece = optax.constant_schedule(reached)
        pieces.append(piece)
        boundaries.append(start)
    return optax.join_schedules(pieces, boundaries) if boundaries else schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm (same empty state, same result) that takes the gradients' global norm as the
    keyword `grad_norm` when the caller has it (the train step computes it once for its finite check too; a norm
    is a full pass over the gradients)."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.global_norm(updates) if grad_norm is None else grad_norm
        keep = norm < max_norm
        return jax.tree.map(lambda t: jnp.where(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """clip_by_global_norm then AdamW(b1 0.9, b2 0.95, eps 1e-8) on `lr_schedule`; weight decay only on Dense
    kernels. `update` takes the gradients' global norm as the keyword `grad_norm` (optional)."""

    def decay_mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path), params)

    return optax.chain(
        clip_by_global_norm(config.clip_norm),
        optax.adamw(lr_schedule(config), b1=0.9, b2=0.95, eps=1e-8, weight_decay=config.weight_decay,
                    mask=decay_mask),
    )


def masked_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """[sum of cross-entropy, correct predictions, scored positions] over the positions where mask == 1."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.stack([jnp.sum(ce * mask), jnp.sum(correct * mask), jnp.sum(mask)])


def fused_masked_sums(model: xLSTMLarge, hidden: jax.Array, targets: jax.Array, mask: jax.Array,
                      block_size: int | None = None) -> jax.Array:
    """`masked_sums` of `model.head(hidden)` computed without the logits (`blocked_cross_entropy`: evaluated alone
    in vocabulary blocks of `block_size`, None: automatic; under differentiation in automatic row blocks): hidden
    (B, S, D) float32, targets (B, S) int, mask (B, S)."""
    x, weight = model.head_operands(hidden)
    c = model.config
    ce, correct = blocked_cross_entropy(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), mask.reshape(-1),
                                        soft_cap=c.output_logit_soft_cap, compute_dtype=c.compute_jnp_dtype,
                                        block_size=block_size)
    return jnp.stack([ce, correct, jnp.sum(mask).astype(ce.dtype)])


def build_steps(graphdef: Any, tx: optax.GradientTransformation, placement: Any = None, remat: bool | str = "none",
                loss: str = "plain", loss_block: int | None = None) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The jitted train step (params, opt_state, mean loss and accuracy of the batch, and whether the loss and the
    gradient norm were finite: a step where they are not changes nothing) and the evaluation sums of one batch.
    The step donates params and opt_state (updated in place: the caller keeps only the returned ones).
    `placement` (param shardings, opt-state shardings): the step keeps parameters and optimizer states where they
    are, and the mLSTM cells split (B, NH, S) over the mesh (`MLSTM_AXES`). `remat` ("none", "block", "dots"; a
    bool: "block" / "none"): what each block keeps for the backward (`xLSTMLarge.__call__`). `loss` "plain" or
    "fused" (`fused_masked_sums`; `loss_block`: its vocabulary blocks when evaluated). The LM head with the loss and
    the optimizer update run under the named scopes "lm_head_loss" and "optimizer" (profiles tell them apart by
    these)."""
    sums = batch_sums(graphdef, None if placement is None else MLSTM_AXES, loss, loss_block)
    tx = optax.with_extra_args_support(tx)  # the global norm goes to a clip that takes it; others ignore it

    def loss_fn(params, batch):
        ce, correct, count = sums(params, batch, remat)
        count = jnp.maximum(count, 1.0)
        return ce / count, correct / count

    def place(tree, which):
        return tree if placement is None else jax.lax.with_sharding_constraint(tree, placement[which])

    def update(grads, norm, params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params, grad_norm=norm)
        return optax.apply_updates(params, updates), opt_state

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        with jax.named_scope("optimizer"):
            norm = optax.global_norm(grads)  # one pass: the finite check's and the clip's
            finite = jnp.isfinite(loss) & jnp.isfinite(norm)
            # a non-finite step leaves parameters and optimizer state as they were (the loop stops the run): the
            # update runs only where it is finite, in place of the donated buffers, with no select over every array
            params, opt_state = jax.lax.cond(finite, update, lambda _, __, *state: state, grads, norm, params,
                                             opt_state)
            return place(params, 0), place(opt_state, 1), loss, acc, finite

    return train_step, eval_step(graphdef, placement is not None, loss, loss_block)


def batch_sums(graphdef: Any, mesh_axes: Any, loss: str = "plain", loss_block: int | None = None
               ) -> Callable[..., Any]:
    """sums(params, batch, remat="none") -> [cross-entropy sum, correct, scored] of one batch for parameters of
    `graphdef` (`loss`, `loss_block`, `remat`: as `build_steps`); mesh_axes: the mLSTM cells' (`MLSTM_AXES` on a
    mesh, else None)."""
    if loss not in LOSS_CHOICES:
        raise ValueError(f"loss must be one of {LOSS_CHOICES}, got {loss!r}.")

    def sums(params, batch, remat="none"):
        model = nnx.merge(graphdef, params)
        hidden = model(batch["inputs"], segment_ids=batch.get("segment_ids"), mesh_axes=mesh_axes, remat=remat,
                       return_hidden=True)
        with jax.named_scope("lm_head_loss"):
            if loss == "fused":
                return fused_masked_sums(model, hidden, batch["targets"], batch["mask"], loss_block)
            return masked_sums(model.head(hidden), batch["targets"], batch["mask"])

    return sums


def eval_step(graphdef: Any, on_mesh: bool = False, loss: str = "plain", loss_block: int | None = None
              ) -> Callable[..., Any]:
    """The jitted evaluation sums of one batch (`masked_sums`) for parameters `params` of `graphdef`: (params,
    batch) -> [cross-entropy sum, correct, scored]. `on_mesh`: the mLSTM cells split (B, NH, S) over the mesh.
    `loss`, `loss_block`: as `build_steps`."""
    return jax.jit(batch_sums(graphdef, MLSTM_AXES if on_mesh else None, loss, loss_block))


def evaluate(eval_sums: Callable[..., Any], params: Any, batches: list[dict[str, jax.Array]]) -> dict[str, float]:
    """eval_loss (mean over scored tokens), eval_perplexity and eval_accuracy over the evaluation batches."""
    total = np.sum([np.asarray(eval_sums(params, batch)) for batch in batches], axis=0)
    count = max(float(total[2]), 1.0)
    loss = float(total[0]) / count
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 80.0))),
            "eval_accuracy": float(total[1]) / count}


def init_params(model_config: Any, seed: int, tx: optax.GradientTransformation, mesh: Any = None,
                sizes: dict[str, int] | None = None) -> tuple[Any, Any, Any, tuple | None]:
    """(graphdef, params, opt_state, placement) of a fresh model. With a mesh, the parameters (initialised eagerly,
    as on one device: a jitted initialisation of a large model compiles for minutes; docs/distributed.md) are moved to
    their shardings, the optimizer states are created in place, and placement is (param shardings, opt-state
    shardings): per-parameter optimizer states follow their parameter, its scalars are replicated. Without a mesh,
    placement is None."""
    graphdef, params = nnx.split(xLSTMLarge(model_config, rngs=nnx.Rngs(seed)))
    if mesh is None:
        return graphdef, params, tx.init(params), None
    shardings = param_shardings(params, mesh, sizes)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
                                          transform_non_params=lambda _: replicated)
    params = jax.device_put(params, shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return graphdef, params, opt_state, (shardings, opt_shardings)


