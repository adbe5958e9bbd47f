"""Training loop: an xLSTM-7B-architecture model (any size) on MQAR generated on the fly or on a corpus (`--data`),
on one device or a device mesh, in one process or several (`xlstm_jax.train.distributed`).

AdamW (weight decay on Dense kernels only), global-norm gradient clipping, linear warmup + cosine decay, a rich
progress bar (loss / accuracy / tokens per second, per device, and MFU on GPUs; without a terminal a progress line
every few seconds), periodic evaluation on a fixed held-out set, `metrics.jsonl`, orbax checkpoints (asynchronous,
sharded) and resume from the newest intact one, on any mesh. Only process 0 prints, logs metrics and exports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from xlstm_jax.models.xlstm_large.model import xLSTMLarge
from xlstm_jax.train.checkpoints import (RunCheckpointer, ShapeMismatch, holds_run, read_run_config,
                                         write_run_config)
from xlstm_jax.train.guards import (LOCK_FILE, Diverged, Interrupted, RunError, RunLock, StopSignals, WriteFailed,
                                    os_reason)
from xlstm_jax.train.config import EXECUTION_FIELDS, RESUME_FIELDS, ConfigError, TrainConfig, remat_choice
from xlstm_jax.train.mesh import batch_sharding, build_mesh, parse_mesh
from xlstm_jax.train.metrics import METRICS_FILE, MetricsLog, model_flops_per_token, peak_flops
from xlstm_jax.train.steps import build_steps, evaluate, init_params, lr_schedule, make_optimizer
from xlstm_jax.train.tasks import make_task


@dataclasses.dataclass
class TrainResult:
    """Where a run ended: step, last evaluation (loss, perplexity, accuracy), throughput (tokens/s after
    compilation, and MFU where the device's peak is known), wall time (seconds), the evaluation history and the
    trained model (gathered from the mesh)."""

    step: int
    eval_loss: float
    eval_perplexity: float
    eval_accuracy: float
    chance_accuracy: float | None
    tokens_per_second: float
    mfu: float | None
    wall_seconds: float
    history: list[dict[str, float]]
    model: xLSTMLarge


def _say(console: Console, text: str) -> None:
    """One plain line (no markup, no wrapping)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _check_output_dir(config: TrainConfig, console: Console) -> dict[str, Any] | None:
    """Check `output_dir` against `resume` (nothing is written); the stored run config of a run to resume."""
    if config.output_dir is None:
        return None
    if not str(config.output_dir).strip():
        raise ConfigError("output_dir", "is empty; name a directory for the run.")
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise ConfigError("output_dir", f"{config.output_dir!r} is not a directory.")
    if os.path.isdir(config.output_dir) and not holds_run(config.output_dir):
        others = [name for name in os.listdir(config.output_dir) if name not in (LOCK_FILE, METRICS_FILE)]
        if others:
            raise ConfigError("output_dir", f"{config.output_dir!r} holds {len(others)} other entries "
                                            f"({', '.join(sorted(others)[:3])}{', ...' * (len(others) > 3)}) and no "
                                            "run of xlstm-jax; choose a new or empty directory.")
    if holds_run(config.output_dir):
        if not config.resume:
            raise ConfigError("output_dir", f"{config.output_dir!r} already holds a run; pass --resume to continue "
                                            "it, or choose another --output-dir.")
        try:
            stored = read_run_config(config.output_dir) or {}
        except ValueError as err:
            raise ConfigError("output_dir", str(err)) from None
        if "remat" in stored:  # a run from before the remat choices stored a bool
            stored = {**stored, "remat": remat_choice(stored["remat"])}
        now = json.loads(json.dumps(config.to_dict()))  # as stored: tuples become lists
        changed = [name for name in RESUME_FIELDS if name in stored and stored[name] != now[name]]
        if changed:
            diffs = "; ".join(f"{name} {stored[name]!r} there, {getattr(config, name)!r} now" for name in changed)
            raise ConfigError(changed[0], f"differs from the run in {config.output_dir!r} ({diffs}); resume with "
                                          "the run's settings, or choose another --output-dir.")
        moved = [f"{name} {stored[name]!r} -> {now[name]!r}" for name in EXECUTION_FIELDS
                 if name in stored and stored[name] != now[name]]
        if moved:
            _say(console, f"resuming with other execution settings (the same model and data): {'; '.join(moved)}")
        return stored
    if config.resume:
        _say(console, f"nothing to resume in {config.output_dir}: starting at step 0")
    return None


def _continue_schedule(config: TrainConfig, stored: dict[str, Any] | None, start: int,
                       console: Console) -> TrainConfig:
    """The config with the learning-rate history of the run it resumes at `start` (`lr_segments`): a new total
    `steps` adds a segment from `start`, along which the rate goes on from where it is to its floor (printed)."""
    if stored is None or start == 0:
        return dataclasses.replace(config, lr_segments=())
    segments = tuple(tuple(pair) for pair in stored.get("lr_segments") or ()) or ((0, int(stored["steps"])),)
    if segments[-1][1] != config.steps and config.steps > start:
        schedule = lr_schedule(dataclasses.replace(config, lr_segments=segments))
        rate = float(schedule(start))
        segments = tuple(pair for pair in segments if pair[0] < start) + ((start, config.steps),)
        floor = config.learning_rate * config.min_lr_ratio
        _say(console, f"the run was planned for {stored['steps']} steps, now {config.steps}: from step {start} the "
                      f"learning rate goes on from {rate:.3g} along a new cosine to {floor:.3g} at step "
                      f"{config.steps}")
    return dataclasses.replace(config, lr_segments=segments)


def _open_checkpoints(config: TrainConfig) -> RunCheckpointer | None:
    """The run's checkpoints (None without an output directory). With several processes, every process has
    checked the directory before any writes (a barrier)."""
    if config.output_dir is None:
        return None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("xlstm_jax: output directory checked")
    return RunCheckpointer(config.output_dir, max_to_keep=config.keep_checkpoints)


def _resume(checkpointer: RunCheckpointer, config: TrainConfig, params: Any, opt_state: Any,
            console: Console) -> tuple[Any, Any, int]:
    """(params, opt_state, step) of the newest intact checkpoint (damaged newer ones are moved aside), or the
    given ones at step 0 when there is none."""
    try:
        restored = checkpointer.restore_newest_intact(
            params, opt_state, report=lambda text: _say(console, f"warning: {text}"))
    except ShapeMismatch as err:
        raise ConfigError("output_dir", f"{err}: these settings build another model than the run in "
                                        f"{config.output_dir!r}; resume with the run's settings, or choose another "
                                        "--output-dir.") from None
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
    """Run (or resume) training; returns the final evaluation and throughput.

    Raises ConfigError before compiling anything when `output_dir` holds a run and `resume` is off, when the run
    to resume had other settings (`RESUME_FIELDS`), when `steps` is below the step it resumes from, or when the
    corpus of `--data` cannot be used.
    """
    main = jax.process_index() == 0
    console = console or Console(quiet=not main)
    stored = _check_output_dir(config, console)
    locks: list[RunLock] = []
    if config.output_dir is not None:
        _say(console, f"output: {config.output_dir}")
        if main and os.path.isdir(config.output_dir):  # a run may be in it: refuse a second trainer at once
            locks.append(_lock(config.output_dir))
    try:
        with StopSignals() as stop:
            return _train(config, stored, stop, console, locks)
    finally:
        for lock in locks:
            lock.release()


def _lock(output_dir: str) -> RunLock:
    """Create the output directory and take its lock (ConfigError when either cannot be done)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = RunLock(output_dir)
        lock.acquire()
    except OSError as err:
        raise ConfigError("output_dir", f"cannot create or write {output_dir!r}: {os_reason(err)}.") from None
    except RuntimeError as err:
        raise ConfigError("output_dir", str(err)) from None
    return lock


def _train(config: TrainConfig, stored: dict[str, Any] | None, stop: StopSignals, console: Console,
           locks: list[RunLock]) -> TrainResult:
    """train() once the output directory is checked; a new output directory is created (and locked) only once the
    data has loaded, so a run that cannot start writes nothing."""
    main = jax.process_index() == 0
    mesh, sizes = None, None
    if config.mesh is not None:
        sizes = parse_mesh(config.mesh)
        mesh = build_mesh(sizes)
    try:
        task = make_task(config, None if mesh is None else batch_sharding(mesh))
    except ValueError as err:
        raise ConfigError("data", str(err)) from None
    _say(console, f"data: {task.describe()}")
    if config.output_dir is not None and main and not locks:
        locks.append(_lock(config.output_dir))
    checkpointer = _open_checkpoints(config)
    model_config = config.model_config(vocab_size=task.vocab_size, special_token_ids=task.special_token_ids)
    tx = make_optimizer(config)
    graphdef, params, opt_state, placement = init_params(model_config, config.seed, tx, mesh, sizes)
    _say(console, f"model: {_describe_model(model_config, params)}")
    start = 0
    metrics = MetricsLog(config.output_dir, enabled=main)
    if checkpointer is not None:
        if config.resume:
            params, opt_state, start = _resume(checkpointer, config, params, opt_state, console)
            metrics.truncate_after(start)
        config = _continue_schedule(config, stored, start, console)
        tx = make_optimizer(config)
        if main:
            write_run_config(config.output_dir, {**config.to_dict(), "model": model_config.to_dict()})
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        train_step, eval_sums = build_steps(graphdef, tx, placement, config.remat, config.loss)
        try:
            result = _run(config, task, model_config, train_step, eval_sums, params, opt_state, start, metrics,
                          checkpointer, console, stop)
        except RunError:
            if checkpointer is not None:
                checkpointer.abandon()
            raise
        finally:
            metrics.close()
    params = result.pop("params")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    model = nnx.merge(graphdef, params)
    if checkpointer is not None:
        _guarded_write(checkpointer.close, f"the last checkpoint in {checkpointer.directory}")
        if main:
            from xlstm_jax.models.xlstm_large.checkpoint import save_pretrained

            export = os.path.join(config.output_dir, "model")
            _guarded_write(lambda: save_pretrained(model, export, layout="hf", tokenizer=task.tokenizer),
                           f"the model export {export}")
    chance = config.task_config().chance_accuracy if config.data is None else None
    return TrainResult(chance_accuracy=chance, model=model, **result)


def _guarded_write(write: Any, what: str) -> Any:
    """write(), with a failure to write (a full disk, no permission) turned into one WriteFailed line."""
    try:
        return write()
    except RunError:
        raise
    except Exception as err:  # orbax, TensorStore and the OS raise many types for a failed write
        raise WriteFailed(f"could not write {what}: {os_reason(err)}. The checkpoints written before it are "
                          "intact; free space (or fix permissions) and resume with --resume.") from None


def _describe_model(model_config: Any, params: Any) -> str:
    """One line: size, heads, backend and dtype of the model."""
    from xlstm_jax.mlstm.api import resolve_backend

    c = model_config
    count = sum(x.size for x in jax.tree.leaves(params))
    return (f"{count:,} parameters: {c.num_blocks} blocks of width {c.embedding_dim}, {c.num_heads} heads "
            f"(q/k {c.qk_head_dim}, v {c.v_head_dim}), mLSTM backend {resolve_backend(c.backend, c.chunk_size)}, "
            f"{c.compute_dtype} matmuls")


def _run(config: TrainConfig, task: Any, model_config: Any, train_step: Any, eval_sums: Any, params: Any,
         opt_state: Any, start: int, metrics: MetricsLog, checkpointer: RunCheckpointer | None,
         console: Console, stop: StopSignals) -> dict[str, Any]:
    """The step loop with progress, logging, evaluation and checkpoints; the TrainResult fields it knows, and
    the final params. Raises Diverged at the first check after a non-finite step (nothing after the last
    checkpoint is saved), Interrupted after checkpointing the step a SIGINT / SIGTERM arrived in, WriteFailed."""
    # the logged learning rate, compiled once here: evaluated op by op, the schedule's first call compiled each of
    # its operations (0.5 s on a CPU) inside the second logging window, whose tokens/s it halved on an H100
    schedule = jax.jit(lr_schedule(config))
    schedule(start)
    devices = jax.device_count()
    tokens_per_step = config.batch_size * config.seq_len
    flops = model_flops_per_token(model_config, config.chunk_size or 64)
    peak = peak_flops(jax.devices()[0], model_config.compute_dtype)
    history: list[dict[str, float]] = []
    last_eval: dict[str, float] = {}
    t_start = time.perf_counter()
    t_after_compile, step_after_compile = None, start
    t_line = t_start
    tps, mfu = 0.0, None
    lines = config.progress and not console.is_terminal  # no terminal: a progress line every progress_seconds
    progress = Progress(
        TextColumn(f"[bold]{task.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=console,
        disable=not config.progress or lines,
    )
    eval_batches = task.eval_batches()

    def run_eval(step: int) -> None:
        last_eval.update(evaluate(eval_sums, params, eval_batches))
        history.append({"step": step, **last_eval})
        if not metrics.has_eval(step):  # a resume of a finished run evaluates it again
            metrics.write({"step": step, **last_eval})
        progress.console.print(f"step {step:>6}  eval loss {last_eval['eval_loss']:.4f}  perplexity "
                               f"{last_eval['eval_perplexity']:.3f}  accuracy {last_eval['eval_accuracy']:.4f}")

    unchecked: list[tuple[int, jax.Array]] = []  # (step, finite flag) not yet read back
    saved = [start] if start else []
    where = "" if checkpointer is None else f" in {config.output_dir}"

    def check_finite(step: int) -> None:
        flags = jax.device_get([flag for _, flag in unchecked])
        bad = [s for (s, _), ok in zip(unchecked, flags) if not ok]
        unchecked.clear()
        if bad:
            last = f"the last checkpoint is step {saved[-1]}" if saved else "no checkpoint was written"
            raise Diverged(f"the loss or the gradient norm was not finite at step {bad[0]} (stopped at step {step}, "
                           f"nothing saved after it; {last}{where}). Resume from it with a lower --lr or "
                           "--clip-norm, or start a new run with other settings.")

    def save(step: int) -> None:
        check_finite(step)
        if not saved or saved[-1] != step:
            _guarded_write(lambda: checkpointer.save(step, params, opt_state),
                           f"checkpoint {step} to {checkpointer.directory}")
            saved.append(step)

    def stop_requested(step: int) -> bool:
        if jax.process_count() == 1:
            return stop.signum is not None
        if step % config.log_every and step != config.steps:
            return False  # several processes agree at logged steps, where they synchronise anyway
        from jax.experimental import multihost_utils

        signum = int(np.max(multihost_utils.process_allgather(np.asarray(stop.signum or 0, np.int32))))
        stop.signum = stop.signum or (signum or None)
        return signum != 0

    task.start(start)
    with progress:
        bar = progress.add_task("train", total=config.steps, completed=start, stats="compiling…")
        step = start
        while step < config.steps:
            params, opt_state, loss, acc, finite = train_step(params, opt_state, task.train_batch(step))
            step += 1
            unchecked.append((step, finite))
            if checkpointer is not None:
                _guarded_write(checkpointer.raise_failure, f"a checkpoint to {checkpointer.directory}")
            if t_after_compile is None:
                jax.block_until_ready(loss)
                t_after_compile, step_after_compile = time.perf_counter(), step
            line_due = lines and (step == start + 1 or time.perf_counter() - t_line >= config.progress_seconds)
            log_due = step % config.log_every == 0 or step == config.steps
            if line_due or log_due:
                check_finite(step)
                loss_v, acc_v = float(loss), float(acc)
                now = time.perf_counter()
                elapsed = now - t_after_compile
                tps = (step - step_after_compile) * tokens_per_step / elapsed if elapsed > 0 else 0.0
                mfu = tps * flops / (peak * devices) if peak else None
                if log_due:
                    _guarded_write(lambda: metrics.write({
                        "step": step, "loss": loss_v, "accuracy": acc_v, "learning_rate": float(schedule(step - 1)),
                        "tokens_per_s": tps, "tokens_per_s_per_device": tps / devices,
                        **({"mfu": mfu} if mfu else {})}), f"metrics to {metrics.path}")
                if step == step_after_compile:  # nothing timed yet: the first step compiled the train step
                    speed = f"first step (compiling included) {t_after_compile - t_start:.1f} s"
                else:
                    speed = (f"{tps:,.0f} tok/s ({tps / devices:,.0f}/device)"
                             + (f"  MFU {100 * mfu:.1f}%" if mfu else ""))
                stats = f"loss {loss_v:.3f}  acc {acc_v:.3f}  {speed}"
                progress.update(bar, completed=step, stats=stats)
                if line_due:
                    _say(console, f"step {step:>6}/{config.steps}  {stats}  {now - t_start:.0f} s elapsed")
                    t_line = now
            if step % config.eval_every == 0 or step == config.steps:
                check_finite(step)
                run_eval(step)
            if checkpointer is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                save(step)
            if stop_requested(step):
                if checkpointer is None:
                    raise Interrupted(f"interrupted by {stop.name} after step {step}; the run has no output "
                                      "directory, nothing was saved.", stop.signum)
                save(step)
                _guarded_write(checkpointer.close, f"checkpoint {step} to {checkpointer.directory}")
                raise Interrupted(f"interrupted by {stop.name} after step {step}: checkpoint {step} is written; "
                                  f"continue with: xlstm-jax train --output-dir {config.output_dir} --resume",
                                  stop.signum)
    check_finite(step)
    if not history or history[-1]["step"] != step:
        run_eval(step)
    return dict(step=step, eval_loss=last_eval["eval_loss"], eval_perplexity=last_eval["eval_perplexity"],
                eval_accuracy=last_eval["eval_accuracy"], tokens_per_second=tps, mfu=mfu,
                wall_seconds=time.perf_counter() - t_start, history=history, params=params)
