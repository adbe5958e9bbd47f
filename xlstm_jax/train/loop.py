"""Training loop: an xLSTM-7B-architecture model (any size) on MQAR generated on the fly.

AdamW (weight decay on Dense kernels only), global-norm gradient clipping, linear warmup + cosine decay, a rich
progress bar (loss / accuracy / tokens per second; without a terminal a progress line every few seconds), periodic
evaluation on a fixed held-out set, orbax checkpoints and resume from the newest intact one. The batch of step t
is a pure function of (seed, t), so a resumed run sees the data it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from xlstm_jax.models.xlstm_large.model import xLSTMLarge
from xlstm_jax.train.checkpoints import RunCheckpointer, holds_run, read_run_config, write_run_config
from xlstm_jax.train.config import RESUME_FIELDS, ConfigError, TrainConfig
from xlstm_jax.train.mesh import batch_sharding, build_mesh, param_shardings, parse_mesh
from xlstm_jax.train.mqar import mqar_batch


@dataclasses.dataclass
class TrainResult:
    """Where a run ended: step, last evaluation, throughput (tokens/s after compilation), wall time (seconds),
    the evaluation history and the trained model."""

    step: int
    eval_loss: float
    eval_accuracy: float
    chance_accuracy: float
    tokens_per_second: float
    wall_seconds: float
    history: list[dict[str, float]]
    model: xLSTMLarge


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm then AdamW(b1 0.9, b2 0.95, eps 1e-8) on a warmup + cosine schedule; weight decay only on
    Dense kernels."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.steps, end_value=config.learning_rate * config.min_lr_ratio,
    )

    def decay_mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path), params)

    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=config.weight_decay, mask=decay_mask),
    )


def masked_metrics(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy over the positions where mask == 1."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    total = jnp.maximum(jnp.sum(mask), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(ce * mask) / total, jnp.sum(correct * mask) / total


def _build_steps(graphdef: Any, tx: optax.GradientTransformation, config: TrainConfig, placement: Any = None
                 ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The jitted train step and evaluation. `placement` (param shardings, opt-state shardings, batch sharding):
    the step keeps parameters and optimizer states where they are and splits each batch."""
    task = config.task_config()
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    eval_key = jax.random.fold_in(jax.random.key(config.seed), 2)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch["inputs"])
        return masked_metrics(logits, batch["targets"], batch["mask"])

    def place(tree, which):
        return tree if placement is None else jax.lax.with_sharding_constraint(tree, placement[which])

    def batch_at(key):
        batch = mqar_batch(key, task, config.batch_size)
        return batch if placement is None else jax.tree.map(lambda x: place(x, 2), batch)

    @jax.jit
    def train_step(params, opt_state, step):
        batch = batch_at(jax.random.fold_in(data_key, step))
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return place(optax.apply_updates(params, updates), 0), place(opt_state, 1), loss, acc

    @jax.jit
    def evaluate(params):
        def one(index):
            return loss_fn(params, batch_at(jax.random.fold_in(eval_key, index)))

        losses, accs = jax.lax.map(one, jnp.arange(config.eval_batches))
        return jnp.mean(losses), jnp.mean(accs)

    return train_step, evaluate


def _place_on_mesh(params: Any, tx: optax.GradientTransformation, mesh_text: str) -> tuple[Any, tuple]:
    """Parameters moved onto the mesh, and (param shardings, opt-state shardings, batch sharding): the optimizer's
    per-parameter states follow their parameter, its scalars are replicated."""
    sizes = parse_mesh(mesh_text)
    mesh = build_mesh(sizes)
    shardings = param_shardings(params, mesh, sizes)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
                                          transform_non_params=lambda _: replicated)
    return jax.device_put(params, shardings), (shardings, opt_shardings, batch_sharding(mesh))


def _say(console: Console, text: str) -> None:
    """One plain line (no markup, no wrapping)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _open_output_dir(config: TrainConfig, console: Console) -> RunCheckpointer | None:
    """Check `output_dir` against `resume` (no jax work yet) and open its checkpoints; None without one."""
    if config.output_dir is None:
        return None
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise ConfigError("output_dir", f"{config.output_dir!r} is not a directory.")
    if holds_run(config.output_dir):
        if not config.resume:
            raise ConfigError("output_dir", f"{config.output_dir!r} already holds a run; pass --resume to continue "
                                            "it, or choose another --output-dir.")
        try:
            stored = read_run_config(config.output_dir) or {}
        except ValueError as err:
            raise ConfigError("output_dir", str(err)) from None
        changed = [name for name in RESUME_FIELDS if name in stored and stored[name] != getattr(config, name)]
        if changed:
            diffs = "; ".join(f"{name} {stored[name]!r} there, {getattr(config, name)!r} now" for name in changed)
            raise ConfigError(changed[0], f"differs from the run in {config.output_dir!r} ({diffs}); resume with "
                                          "the run's settings, or choose another --output-dir.")
    elif config.resume:
        _say(console, f"nothing to resume in {config.output_dir}: starting at step 0")
    return RunCheckpointer(config.output_dir, max_to_keep=config.keep_checkpoints)


def _resume(checkpointer: RunCheckpointer, config: TrainConfig, params: Any, opt_state: Any,
            console: Console) -> tuple[Any, Any, int]:
    """(params, opt_state, step) of the newest intact checkpoint (damaged newer ones are moved aside), or the
    given ones at step 0 when there is none."""
    restored = checkpointer.restore_newest_intact(
        params, opt_state, report=lambda text: _say(console, f"warning: {text}"))
    if restored is None:
        _say(console, f"no intact checkpoint in {checkpointer.directory}: starting at step 0")
        return params, opt_state, 0
    params, opt_state, start = restored
    if config.steps < start:
        raise ConfigError("steps", f"{config.steps} is below step {start} of the checkpoint it resumes from "
                                   f"({checkpointer.directory}); pass --steps {start} or more.")
    _say(console, f"resumed from step {start} in {checkpointer.directory}")
    return params, opt_state, start


def train(config: TrainConfig, *, console: Console | None = None) -> TrainResult:
    """Run (or resume) MQAR training; returns the final evaluation and throughput.

    Raises ConfigError before compiling anything when `output_dir` holds a run and `resume` is off, when the run
    to resume had other settings (`RESUME_FIELDS`), or when `steps` is below the step it resumes from.
    """
    console = console or Console()
    task = config.task_config()
    checkpointer = _open_output_dir(config, console)
    model = xLSTMLarge(config.model_config(), rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(config)
    placement = None
    if config.mesh is not None:
        params, placement = _place_on_mesh(params, tx, config.mesh)
    opt_state = tx.init(params) if placement is None else jax.jit(tx.init, out_shardings=placement[1])(params)
    start = 0
    if checkpointer is not None:
        if config.resume:
            params, opt_state, start = _resume(checkpointer, config, params, opt_state, console)
        write_run_config(config.output_dir, {**config.to_dict(), "model": config.model_config().to_dict()})
    train_step, evaluate = _build_steps(graphdef, tx, config, placement)
    tokens_per_step = config.batch_size * config.seq_len
    history: list[dict[str, float]] = []
    eval_loss = eval_acc = float("nan")
    t_start = time.perf_counter()
    t_after_compile, step_after_compile = None, start
    t_line = t_start
    tps = 0.0
    lines = config.progress and not console.is_terminal  # no terminal: a progress line every progress_seconds
    progress = Progress(
        TextColumn("[bold]MQAR"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"), console=console, disable=not config.progress or lines,
    )
    with progress:
        bar = progress.add_task("train", total=config.steps, completed=start, stats="compiling…")
        step = start
        while step < config.steps:
            params, opt_state, loss, acc = train_step(params, opt_state, jnp.asarray(step, jnp.int32))
            step += 1
            if t_after_compile is None:
                jax.block_until_ready(loss)
                t_after_compile, step_after_compile = time.perf_counter(), step
            line_due = lines and time.perf_counter() - t_line >= config.progress_seconds
            if line_due or step % config.log_every == 0 or step == config.steps:
                loss_v, acc_v = float(loss), float(acc)
                now = time.perf_counter()
                elapsed = now - t_after_compile
                tps = (step - step_after_compile) * tokens_per_step / elapsed if elapsed > 0 else 0.0
                stats = f"loss {loss_v:.3f}  acc {acc_v:.3f}  {tps:,.0f} tok/s"
                progress.update(bar, completed=step, stats=stats)
                if line_due:
                    _say(console, f"step {step:>6}/{config.steps}  {stats}  {now - t_start:.0f} s elapsed")
                    t_line = now
            if step % config.eval_every == 0 or step == config.steps:
                eval_loss, eval_acc = (float(x) for x in evaluate(params))
                history.append({"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_acc})
                progress.console.print(f"step {step:>6}  eval loss {eval_loss:.4f}  eval accuracy {eval_acc:.4f}"
                                       f"  (chance {task.chance_accuracy:.4f})")
            if checkpointer is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                checkpointer.save(step, params, opt_state)
    if not history or history[-1]["step"] != step:
        eval_loss, eval_acc = (float(x) for x in evaluate(params))
        history.append({"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_acc})
    model = nnx.merge(graphdef, params)
    if checkpointer is not None:
        from xlstm_jax.models.xlstm_large.checkpoint import save_pretrained

        checkpointer.close()
        save_pretrained(model, f"{config.output_dir}/model", layout="hf")
    return TrainResult(step=step, eval_loss=eval_loss, eval_accuracy=eval_acc, chance_accuracy=task.chance_accuracy,
                       tokens_per_second=tps, wall_seconds=time.perf_counter() - t_start, history=history,
                       model=model)
