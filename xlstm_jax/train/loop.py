"""Training loop: an xLSTM-7B-architecture model (any size) on MQAR generated on the fly.

AdamW (weight decay on Dense kernels only), global-norm gradient clipping, linear warmup + cosine decay, a rich
progress bar (loss / accuracy / tokens per second), periodic evaluation on a fixed held-out set, orbax checkpoints
and resume. The batch of step t is a pure function of (seed, t), so a resumed run sees the data it would have seen.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from xlstm_jax.models.xlstm_large.model import xLSTMLarge
from xlstm_jax.train.checkpoints import RunCheckpointer, read_run_config, write_run_config
from xlstm_jax.train.config import RESUME_FIELDS, TrainConfig
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
    Dense kernels (spec §5)."""
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


def _build_steps(graphdef: Any, tx: optax.GradientTransformation, config: TrainConfig
                 ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    task = config.task_config()
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    eval_key = jax.random.fold_in(jax.random.key(config.seed), 2)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch["inputs"])
        return masked_metrics(logits, batch["targets"], batch["mask"])

    @jax.jit
    def train_step(params, opt_state, step):
        batch = mqar_batch(jax.random.fold_in(data_key, step), task, config.batch_size)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    @jax.jit
    def evaluate(params):
        def one(index):
            return loss_fn(params, mqar_batch(jax.random.fold_in(eval_key, index), task, config.batch_size))

        losses, accs = jax.lax.map(one, jnp.arange(config.eval_batches))
        return jnp.mean(losses), jnp.mean(accs)

    return train_step, evaluate


def _check_resume(output_dir: str, config: TrainConfig) -> None:
    stored = read_run_config(output_dir)
    if stored is None:
        return
    diff = {name: (stored.get(name), getattr(config, name)) for name in RESUME_FIELDS
            if stored.get(name) != getattr(config, name)}
    if diff:
        raise ValueError(f"cannot resume from {output_dir!r}: the run was started with different settings "
                         f"(stored, requested): {diff}.")


def train(config: TrainConfig, *, console: Console | None = None) -> TrainResult:
    """Run (or resume) MQAR training; returns the final evaluation and throughput."""
    console = console or Console()
    task = config.task_config()
    model = xLSTMLarge(config.model_config(), rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(config)
    opt_state = tx.init(params)
    start = 0
    checkpointer = None
    if config.output_dir is not None:
        checkpointer = RunCheckpointer(config.output_dir, max_to_keep=config.keep_checkpoints)
        latest = checkpointer.latest_step()
        if latest is not None:
            if not config.resume:
                raise ValueError(f"{config.output_dir!r} already holds checkpoints (latest step {latest}); pass "
                                 "resume=True (--resume) to continue, or choose a new output directory.")
            _check_resume(config.output_dir, config)
            params, opt_state, start = checkpointer.restore(latest, params, opt_state)
            console.print(f"resumed from step {start} in {checkpointer.directory}")
        write_run_config(config.output_dir, {**config.to_dict(), "model": config.model_config().to_dict()})
    train_step, evaluate = _build_steps(graphdef, tx, config)
    every_ckpt = config.checkpoint_every or config.eval_every
    tokens_per_step = config.batch_size * config.seq_len
    history: list[dict[str, float]] = []
    eval_loss = eval_acc = float("nan")
    t_start = time.perf_counter()
    t_after_compile, step_after_compile = None, start
    tps = 0.0
    progress = Progress(
        TextColumn("[bold]MQAR"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"), console=console, disable=not config.progress,
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
            if step % config.log_every == 0 or step == config.steps:
                loss_v, acc_v = float(loss), float(acc)
                elapsed = time.perf_counter() - t_after_compile
                tps = (step - step_after_compile) * tokens_per_step / elapsed if elapsed > 0 else 0.0
                progress.update(bar, completed=step,
                                stats=f"loss {loss_v:.3f}  acc {acc_v:.3f}  {tps:,.0f} tok/s")
            if step % config.eval_every == 0 or step == config.steps:
                eval_loss, eval_acc = (float(x) for x in evaluate(params))
                history.append({"step": step, "eval_loss": eval_loss, "eval_accuracy": eval_acc})
                progress.console.print(f"step {step:>6}  eval loss {eval_loss:.4f}  eval accuracy {eval_acc:.4f}"
                                       f"  (chance {task.chance_accuracy:.4f})")
            if checkpointer is not None and (step % every_ckpt == 0 or step == config.steps):
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
