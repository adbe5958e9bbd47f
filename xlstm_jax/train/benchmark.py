"""The training job's step on random tokens at the benchmark sizes, for the throughput and profile scripts
(scripts/train_throughput.py, scripts/profile_train.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from xlstm_jax.bench.measure import timed_runs
from xlstm_jax.train.config import TrainConfig
from xlstm_jax.train.mesh import batch_sharding, build_mesh, parse_mesh
from xlstm_jax.train.steps import build_steps, init_params, make_optimizer

BACK_TO_BACK = 5  # steps dispatched before one wait when timing steps as the training loop runs them
SIZES = {  # tied embeddings; vocabulary 50304 (256 for tiny)
    "125m": dict(embedding_dim=768, num_heads=4, num_blocks=12),
    "1.3b": dict(embedding_dim=2048, num_heads=8, num_blocks=24),
    "tiny": dict(embedding_dim=64, num_heads=2, num_blocks=2),
}


@dataclasses.dataclass
class SyntheticStep:
    """A jitted `train_step(*args)` (`xlstm_jax.train.steps.build_steps`), its arguments (params, opt_state, batch),
    the model config, its parameter count and the mesh (None: one device)."""

    train_step: Callable[..., Any]
    args: tuple
    model_config: Any
    n_params: int
    mesh: Any

    def compile(self) -> tuple[Any, float]:
        """(`train_step` compiled for `args`, under the step's mesh where it has one; seconds the compilation took)."""
        start = time.perf_counter()
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            compiled = self.train_step.lower(*self.args).compile()
        return compiled, time.perf_counter() - start

    def run(self, step: Callable[..., Any] | None = None) -> tuple:
        """One training step from the current state as the training loop runs it: params and opt_state are
        donated, and the step's new ones are the next step's arguments. `step`: `train_step` or its compiled
        form. Returns the step's outputs (params, opt_state, loss, accuracy, finite)."""
        out = (step or self.train_step)(*self.args)
        self.args = (out[0], out[1], self.args[2])
        return out

    def seconds(self, step: Callable[..., Any], reps: int, back_to_back: int) -> list[float]:
        """Seconds per step of `reps` timed runs of `back_to_back` steps dispatched one after the other with one
        wait at the end (the training loop reads the loss only at log lines, so the host dispatches ahead; 1: the
        host waits for every step), after `timed_runs`' untimed warm-up steps."""
        return timed_runs(lambda: self.run(step), jax.block_until_ready, reps, calls=back_to_back)[0]


def synthetic_step(size: str, backend: str, batch: int, seq_len: int, dtype: str = "bfloat16",
                   mesh_text: str | None = None, loss: str = "fused", remat: str = "none",
                   loss_block: int | None = None, weight_mode: str = "single") -> SyntheticStep:
    """The step of `SIZES[size]` (tied embeddings) with AdamW, on `batch` random sequences of `seq_len` tokens
    packed with about two document starts per 2048 tokens, all positions scored; placed on `mesh_text` (a --mesh
    value; the step must then run under `jax.set_mesh(step.mesh)`). loss, remat, loss_block: as `build_steps`;
    weight_mode: as `TrainConfig`."""
    vocab = 256 if size == "tiny" else 50304
    config = TrainConfig(**SIZES[size], vocab_size=vocab, seq_len=seq_len, batch_size=batch, backend=backend,
                         compute_dtype=dtype, mesh=mesh_text, steps=100, progress=False, loss=loss, remat=remat,
                         weight_mode=weight_mode)
    model_config = dataclasses.replace(config.model_config(), tie_word_embeddings=True)
    tx = make_optimizer(config)
    mesh = sizes = None
    if mesh_text is not None:
        sizes = parse_mesh(mesh_text)
        mesh = build_mesh(sizes)
    graphdef, params, opt_state, placement = init_params(model_config, 0, tx, mesh, sizes)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, vocab)
    segment_ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(2), 1 / 1024, (batch, seq_len)), axis=1)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids.astype(jnp.int32),
            "mask": jnp.ones((batch, seq_len), jnp.float32)}
    if mesh is not None:
        data = jax.device_put(data, batch_sharding(mesh))
    train_step, _ = build_steps(graphdef, tx, placement, config.remat, config.loss, loss_block)
    return SyntheticStep(train_step, (params, opt_state, data), model_config, n_params, mesh)
