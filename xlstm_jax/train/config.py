"""Configuration of an MQAR training run (importing this module does not import flax, optax or orbax)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from xlstm_jax.models.xlstm_large.config import xLSTMLargeConfig
from xlstm_jax.train.mqar import MQARConfig

# Fields that must match between a run and the run it resumes: everything that shapes the model, the data or the
# optimizer trajectory, except the total step count (a resumed run may go further; the cosine schedule then
# follows the new total) and the logging / evaluation / checkpoint cadence.
RESUME_FIELDS = ("vocab_size", "seq_len", "num_kv_pairs", "num_queries", "embedding_dim", "num_heads", "num_blocks",
                 "igate_bias_init", "batch_size", "learning_rate", "warmup_steps", "min_lr_ratio", "weight_decay",
                 "clip_norm", "seed")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One MQAR training run.

    The defaults (8 keys / 8 values, 4 pairs, 32 tokens; D 64, 2 blocks, 2 heads; 12000 steps of 32 sequences) took
    244 s on a 2-core CPU and reached held-out accuracy 1.000 (chance 0.125): the model sits at ~0.37-0.48 (it
    knows the answer is one of the 4 values in the context) until the recall circuit forms around step 8000.
    """

    vocab_size: int = 17
    seq_len: int = 32
    num_kv_pairs: int = 4
    num_queries: int | None = None
    embedding_dim: int = 64
    num_heads: int = 2
    num_blocks: int = 2
    igate_bias_init: float = -10.0
    backend: str = "auto"
    chunk_size: int | None = None
    compute_dtype: str = "auto"
    steps: int = 12000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int = 1000
    eval_batches: int = 8
    seed: int = 0
    output_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive int or None, got {self.checkpoint_every!r}.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps = {self.steps}), got {self.warmup_steps}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}.")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"compute_dtype must be auto, float32, bfloat16 or float16, got {self.compute_dtype!r}.")
        self.task_config()
        self.model_config()

    def task_config(self) -> MQARConfig:
        return MQARConfig(vocab_size=self.vocab_size, seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs,
                          num_queries=self.num_queries)

    def model_config(self) -> xLSTMLargeConfig:
        """The model: the xLSTM-7B architecture and initialisation at this size. compute_dtype "auto": bfloat16
        on a GPU, float32 elsewhere (bfloat16 matmuls are slow on CPUs)."""
        dtype = self.compute_dtype
        if dtype == "auto":
            dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
        return xLSTMLargeConfig(
            embedding_dim=self.embedding_dim, num_heads=self.num_heads, num_blocks=self.num_blocks,
            vocab_size=self.vocab_size, backend=self.backend, chunk_size=self.chunk_size, compute_dtype=dtype,
            igate_bias_init=self.igate_bias_init,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
