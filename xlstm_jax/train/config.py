"""Configuration of a training run: the MQAR task (`MQARConfig`) and the run (`TrainConfig`).

Importing this module imports neither jax, flax, optax nor orbax (so that `xlstm-jax train --help` answers at
once); building a `TrainConfig` imports jax to check the backend. Every bad setting raises `ConfigError`, a
`ValueError` that names the field, which `xlstm-jax train` reports as its flag.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Fields that must match between a run and the run it resumes: everything that shapes the model, the data or the
# optimizer state. A resume may change the run's length (`steps`: the learning rate then goes on from where it is,
# see `lr_segments`), the cadence of logging, evaluation and checkpoints, and where and how it runs (backend,
# chunk size, mesh, remat, loss).
RESUME_FIELDS = ("vocab_size", "seq_len", "num_kv_pairs", "num_queries", "embedding_dim", "num_heads", "num_blocks",
                 "igate_bias_init", "fgate_bias_init_range", "weight_mode", "batch_size", "warmup_steps",
                 "min_lr_ratio", "weight_decay", "seed", "data", "tokenizer", "token_dtype", "eos_id",
                 "eval_fraction", "doc_separator")
# Fields a resume may change, announced when they differ: how (not what) it computes, and the step size (a run that
# diverged goes on from its last checkpoint with a lower peak learning rate or clip norm).
EXECUTION_FIELDS = ("backend", "chunk_size", "compute_dtype", "mesh", "remat", "loss", "learning_rate",
                    "clip_norm")
# Fields a resume never takes from the stored run: where it is and that it resumes, and how it reports progress.
NOT_INHERITED = ("output_dir", "resume", "progress", "lr_segments")
TEXT_SUFFIXES = (".txt", ".jsonl")
REMAT_CHOICES = ("none", "block", "dots")  # what each block keeps for the backward (`xLSTMLarge.__call__`)
LOSS_CHOICES = ("plain", "fused")  # the loss over the logits, or `xlstm_jax.train.losses` (no logits stored)
# xLSTMLargeConfig's weight modes (one matmul per projection, or per group), named here again: this module imports no
# jax, which the model's config does
WEIGHT_MODES = ("single", "fused")
# Gate-bias initialisation (input-gate bias, forget-gate bias range over the heads) when not given. MQAR's gives one
# head short memory for the previous-token lookup the recall needs (the xLSTM-7B block has no convolution) and input
# gates open from the start: the recall circuit forms within 250-500 steps, where the xLSTM-7B initialisation took
# 8000 steps or more, or never (docs/training.md). Language models on --data start as xLSTM-7B does.
MQAR_GATE_INIT = (0.0, (-2.0, 4.0))
XLSTM_7B_GATE_INIT = (-10.0, (3.0, 6.0))


class ConfigError(ValueError):
    """A setting that cannot work: `field` is the config field (the CLI names its flag), `reason` says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def remat_choice(value: Any) -> Any:
    """A `remat` setting as a `REMAT_CHOICES` name: a stored run's bool (before the choices) as "block" / "none";
    anything else as it is."""
    return ("block" if value else "none") if isinstance(value, bool) else value


def _is_real(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(name, f"must be a positive int, got {value!r}.")


def check_backend(backend: str, chunk_size: int | None = None, field: str = "backend") -> None:
    """Raise ConfigError unless `backend` is a known mLSTM backend, can run on this machine and takes
    `chunk_size` (None: the backend's default)."""
    from xlstm_jax.kernels.base import check_chunk_size
    from xlstm_jax.mlstm.api import BACKEND_NAMES, IMPLEMENTATIONS, resolve_backend

    if backend not in BACKEND_NAMES:
        raise ConfigError(field, f"unknown backend {backend!r}; choose from {list(BACKEND_NAMES)}.")
    try:
        name = resolve_backend(backend, chunk_size)
    except RuntimeError as err:
        raise ConfigError(field, str(err)) from None
    sizes = IMPLEMENTATIONS[name].chunk_sizes
    if chunk_size is None:
        return
    if sizes is None:
        raise ConfigError("chunk_size", f"backend {name} does not take a chunk size, got {chunk_size}.")
    try:
        check_chunk_size(chunk_size, minimum=sizes[0], maximum=sizes[1])
    except ValueError:
        raise ConfigError("chunk_size", f"backend {name} takes a power of two in {sizes[0]}..{sizes[1]}, got "
                                        f"{chunk_size}.") from None


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """vocab_size V (>= 5), seq_len S, num_kv_pairs N (<= K keys), num_queries Q (None: (S - 2N) // 2 slots);
    the task is described in `xlstm_jax.train.mqar`."""

    vocab_size: int = 17
    seq_len: int = 32
    num_kv_pairs: int = 4
    num_queries: int | None = None

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("vocab_size", "seq_len", "num_kv_pairs"))
        if self.vocab_size < 5:
            raise ConfigError("vocab_size", f"must be >= 5 (filler, keys and values), got {self.vocab_size}.")
        if self.num_kv_pairs > self.num_keys:
            raise ConfigError("num_kv_pairs", f"{self.num_kv_pairs} needs at least that many keys, but vocab_size "
                                              f"{self.vocab_size} gives {self.num_keys} keys.")
        if self.num_slots < 1:
            raise ConfigError("seq_len", f"{self.seq_len} leaves no room for queries after num_kv_pairs = "
                                         f"{self.num_kv_pairs} pairs: needs seq_len >= 2 * num_kv_pairs + 2.")
        if self.num_queries is not None and not 1 <= self.num_queries <= self.num_slots:
            raise ConfigError("num_queries", f"must be in [1, {self.num_slots}] ((seq_len - 2 * num_kv_pairs) // 2) "
                                             f"or None, got {self.num_queries!r}.")

    @property
    def num_slots(self) -> int:
        """Two-token query slots after the context."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    @property
    def queries(self) -> int:
        """Queries per sequence (None: every slot)."""
        return self.num_slots if self.num_queries is None else self.num_queries

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - 1) // 2

    @property
    def num_values(self) -> int:
        return self.vocab_size - 1 - self.num_keys

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / self.num_values


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: MQAR generated on the fly, or next-token prediction on `data`.

    The defaults (8 keys / 8 values, 4 pairs, 32 tokens; D 64, 2 blocks, 4 heads; 3000 steps of 32 sequences at a
    peak learning rate of 1e-3) are the README's main job: `xlstm_jax.train.cli.TRAIN_DESCRIPTION` gives its time
    and docs/training.md the seeds sweep behind its promise.

    Cadences left None follow `steps`: warmup_steps = min(100, steps // 10), eval_every = min(1000, steps // 4)
    (at least 1), checkpoint_every = eval_every. Gate-bias initialisations left None follow the task
    (`MQAR_GATE_INIT`, `XLSTM_7B_GATE_INIT` for `data`). Checkpoints and the exported model go to `output_dir`
    (None: none are written); `resume` continues the run there (`TrainConfig.resumed` takes the stored settings).
    `lr_segments` ((start step, end step), ...) is the schedule's history, kept by the run: linear warmup + cosine
    decay to min_lr_ratio x peak over the first; each later one is a resume that changed `steps`, from whose start
    the rate decays along a new cosine from where it was to the same floor (empty: one segment to `steps`).
    With `progress`, a terminal shows a progress bar and other outputs get a progress line after the first step
    and every `progress_seconds`. `mesh` ("data=2,fsdp=2,tensor=2"; None: one device) places the run on a device
    mesh (`xlstm_jax.train.mesh`). `remat` (`REMAT_CHOICES`): "block" recomputes each block in the backward from
    its input (least activation memory), "dots" keeps the projections' outputs and recomputes the rest, "none"
    keeps everything; a stored run's true / false (before the choices) reads as "block" / "none". `loss` "fused"
    computes the cross-entropy in vocabulary blocks without storing the (B S, V) logits
    (`xlstm_jax.train.losses`), "plain" from the logits; the two are the same function. `weight_mode`
    (`WEIGHT_MODES`): the model's projections as one matmul per q, k, v, output gate, gate and FFN half ("single",
    xLSTM-7B's layout) or one per group ("fused": q|k|v|o, i|f and gate|up); the same function, exported in its
    weight mode (both load, here and in `transformers`).

    `data` (paths, all of one kind: token files .npy/.bin, or text .txt/.jsonl with `tokenizer`) trains a language
    model on them instead of MQAR (`xlstm_jax.train.data`: packing with segment ids, a held-out `eval_fraction`;
    a .txt file is one document, or the pieces between `doc_separator`s).
    vocab_size None: 17 for MQAR; the tokenizer's, or the token files' largest id + 1, for `data`.
    """

    vocab_size: int | None = None
    seq_len: int = 32
    num_kv_pairs: int = 4
    num_queries: int | None = None
    embedding_dim: int = 64
    num_heads: int = 4
    num_blocks: int = 2
    igate_bias_init: float | None = None
    fgate_bias_init_range: tuple[float, float] | None = None
    weight_mode: str = "single"
    backend: str = "auto"
    chunk_size: int | None = None
    compute_dtype: str = "auto"
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    eval_every: int | None = None
    eval_batches: int = 8
    seed: int = 0
    output_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    progress_seconds: float = 15.0
    log_every: int = 10
    mesh: str | None = None
    remat: str = "none"
    loss: str = "fused"
    data: tuple[str, ...] | None = None
    tokenizer: str | None = None
    token_dtype: str = "uint16"
    eos_id: int | None = None
    eval_fraction: float = 0.01
    doc_separator: str | None = None
    lr_segments: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("steps",))
        if self.data is None and self.vocab_size is None:
            object.__setattr__(self, "vocab_size", 17)
        if self.data is not None:
            self._check_data()
        elif self.doc_separator is not None:
            raise ConfigError("doc_separator", "applies to .txt files given with --data.")
        igate, fgate = MQAR_GATE_INIT if self.data is None else XLSTM_7B_GATE_INIT
        for name, default in (("warmup_steps", min(100, self.steps // 10)),
                              ("eval_every", max(1, min(1000, self.steps // 4))),
                              ("igate_bias_init", igate), ("fgate_bias_init_range", fgate)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        self._check_gate_init()
        self._check_lr_segments()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must be an int in [0, 2^63), got {self.seed!r}.")
        if self.checkpoint_every is None:
            object.__setattr__(self, "checkpoint_every", self.eval_every)
        _check_positive_ints(self, ("batch_size", "eval_every", "eval_batches", "checkpoint_every",
                                    "keep_checkpoints", "log_every", "embedding_dim", "num_heads", "num_blocks"))
        warmup = self.warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < self.steps:
            raise ConfigError("warmup_steps", f"must be an int in [0, steps = {self.steps}), got {warmup!r}.")
        for name, ok, rule in (("learning_rate", self.learning_rate > 0, "> 0"),
                               ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("clip_norm", self.clip_norm > 0, "> 0"),
                               ("progress_seconds", self.progress_seconds >= 0, ">= 0")):
            if not (ok and _is_real(getattr(self, name))):
                raise ConfigError(name, f"must be a finite number {rule}, got {getattr(self, name)}.")
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", remat_choice(self.remat))
        for name, choices in (("remat", REMAT_CHOICES), ("loss", LOSS_CHOICES), ("weight_mode", WEIGHT_MODES)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}.")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("compute_dtype", f"must be auto, float32, bfloat16 or float16, got "
                                               f"{self.compute_dtype!r}.")
        if self.resume and self.output_dir is None:
            raise ConfigError("resume", "needs the output directory of the run to continue (--output-dir).")
        if self.data is None:
            self.task_config()
        check_backend(self.backend, self.chunk_size)
        if self.mesh is not None:
            import jax

            from xlstm_jax.train.mesh import BATCH, check_mesh, parse_mesh

            try:
                sizes = parse_mesh(self.mesh)
                check_mesh(sizes, devices=jax.device_count(), num_heads=self.num_heads, seq_len=self.seq_len)
            except ValueError as err:
                raise ConfigError("mesh", str(err)) from None
            replicas = sizes[BATCH[0]] * sizes[BATCH[1]]
            if self.batch_size % replicas:
                raise ConfigError("batch_size", f"{self.batch_size} is not divisible by data x fsdp = {replicas}.")
        try:
            self.model_config(vocab_size=self.vocab_size or 17)
        except ValueError as err:
            # The fields it reads are checked above, except how the q/k and v widths split into heads.
            raise ConfigError("num_heads", str(err)) from None

    def _check_gate_init(self) -> None:
        if not _is_real(self.igate_bias_init):
            raise ConfigError("igate_bias_init", f"must be a finite number, got {self.igate_bias_init!r}.")
        pair = self.fgate_bias_init_range
        if isinstance(pair, (list, tuple)) and len(pair) == 2 and all(map(_is_real, pair)):
            object.__setattr__(self, "fgate_bias_init_range", (float(pair[0]), float(pair[1])))
        else:
            raise ConfigError("fgate_bias_init_range", f"must be two finite numbers (low, high), got {pair!r}.")

    def _check_lr_segments(self) -> None:
        try:
            segments = tuple((int(a), int(b)) for a, b in self.lr_segments)
        except (TypeError, ValueError):
            raise ConfigError("lr_segments", f"must be (start, end) step pairs, got {self.lr_segments!r}.") from None
        object.__setattr__(self, "lr_segments", segments)
        if not segments:
            return
        starts_ok = segments[0][0] == 0 and all(a < b for a, b in segments)
        chained = all(segments[k + 1][0] <= segments[k][1] and segments[k + 1][0] > segments[k][0]
                      for k in range(len(segments) - 1))
        if not (starts_ok and chained):
            raise ConfigError("lr_segments", f"must be (start, end) step pairs, the first from step 0, each later one "
                                             f"starting inside the one before it; got {segments}.")

    def _check_data(self) -> None:
        paths = (self.data,) if isinstance(self.data, str) else tuple(self.data)
        object.__setattr__(self, "data", paths)
        if not paths:
            raise ConfigError("data", "needs at least one file.")
        if any(str(p).endswith(TEXT_SUFFIXES) for p in paths) and self.tokenizer is None:
            raise ConfigError("tokenizer", "text data (.txt, .jsonl) needs a tokenizer: --tokenizer tokenizer.json.")
        if self.token_dtype not in ("uint16", "uint32"):
            raise ConfigError("token_dtype", f"must be uint16 or uint32, got {self.token_dtype!r}.")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}.")
        if self.eos_id is not None and (isinstance(self.eos_id, bool) or self.eos_id < 0):
            raise ConfigError("eos_id", f"must be a token id >= 0, got {self.eos_id!r}.")
        if self.vocab_size is not None:
            _check_positive_ints(self, ("vocab_size",))
        if self.doc_separator is not None:
            if not isinstance(self.doc_separator, str) or not self.doc_separator:
                raise ConfigError("doc_separator", f"must be a non-empty string, got {self.doc_separator!r}.")
            if not any(str(p).endswith(".txt") for p in paths):
                raise ConfigError("doc_separator", f"splits .txt files, and the data has none ({paths[0]}).")

    def data_spec(self) -> Any:
        """The `xlstm_jax.train.data.DataSpec` of `data`."""
        from xlstm_jax.train.data import DataSpec

        return DataSpec(paths=tuple(self.data), tokenizer=self.tokenizer, token_dtype=self.token_dtype,
                        eos_id=self.eos_id, eval_fraction=self.eval_fraction, doc_separator=self.doc_separator)

    def task_config(self) -> MQARConfig:
        """The MQAR task (MQAR runs only)."""
        return MQARConfig(vocab_size=self.vocab_size, seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs,
                          num_queries=self.num_queries)

    def model_config(self, vocab_size: int | None = None, special_token_ids: dict[str, Any] | None = None) -> Any:
        """The model (an `xLSTMLargeConfig`): the xLSTM-7B architecture and initialisation at this size, for
        `vocab_size` tokens (None: the config's), with the task's bos/eos/pad ids (`special_token_ids`; None: the
        xLSTM-7B defaults). compute_dtype "auto": bfloat16 on a GPU, float32 elsewhere (bfloat16 matmuls are slow
        on CPUs)."""
        import jax

        from xlstm_jax.models.xlstm_large.config import xLSTMLargeConfig

        dtype = self.compute_dtype
        if dtype == "auto":
            dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
        return xLSTMLargeConfig(
            embedding_dim=self.embedding_dim, num_heads=self.num_heads, num_blocks=self.num_blocks,
            vocab_size=vocab_size or self.vocab_size, backend=self.backend, chunk_size=self.chunk_size,
            compute_dtype=dtype,
            igate_bias_init=self.igate_bias_init, fgate_bias_init_range=self.fgate_bias_init_range,
            weight_mode=self.weight_mode, **(special_token_ids or {}),
        )

    def schedule_segments(self) -> tuple[tuple[int, int], ...]:
        """`lr_segments`, or the one segment (0, steps) of a run that never changed its length."""
        return self.lr_segments or ((0, self.steps),)

    @classmethod
    def resumed(cls, output_dir: str, **given: Any) -> "TrainConfig":
        """The config that resumes the run in `output_dir`: its stored settings (`train_config.json`), with
        `given` fields replacing them (a changed `RESUME_FIELDS` field is refused when training starts). Without
        a stored config (a run from before configs were stored, or none yet), only `given` and the defaults."""
        from xlstm_jax.train.checkpoints import read_run_config

        try:
            stored = read_run_config(output_dir) or {}
        except ValueError as err:
            raise ConfigError("output_dir", str(err)) from None
        names = {f.name for f in dataclasses.fields(cls)} - set(NOT_INHERITED)
        fields = {name: value for name, value in stored.items() if name in names}
        if isinstance(fields.get("data"), list):
            fields["data"] = tuple(fields["data"])
        if isinstance(fields.get("fgate_bias_init_range"), list):
            fields["fgate_bias_init_range"] = tuple(fields["fgate_bias_init_range"])
        if stored and "loss" not in stored:  # stored before the choice existed: it trained with the plain loss
            fields["loss"] = "plain"
        fields.update(given)
        return cls(**{**fields, "output_dir": output_dir, "resume": True})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
