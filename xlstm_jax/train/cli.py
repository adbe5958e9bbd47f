"""argparse wiring for `xlstm-jax train`: `add_train_arguments(parser)` / `run_train(args)`, and the helpers the
other commands share (`fail`, `flag`, `parse_separator`; `xlstm_jax.generate_cli`, `xlstm_jax.eval_cli`).

`run_*` return the exit status: 0, or 2 after printing one `error: FLAG: reason` line to stderr for a setting or
input that cannot work (`TrainConfig` checks the training flags). Building the parsers imports neither jax, flax,
optax nor orbax.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

from xlstm_jax.train.config import ConfigError, TrainConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_FLAGS = {"learning_rate": "--lr", "compute_dtype": "--dtype", "progress": "--no-progress"}

TRAIN_DESCRIPTION = (
    "Train an xLSTM-7B-architecture language model (any size) on multi-query associative recall (MQAR) generated "
    "on the fly, or on your own token or text files (--data), on one device, a device mesh (--mesh) or several "
    "hosts (--coordinator, or SLURM / Open MPI): AdamW with weight decay on kernels, gradient clipping, linear "
    "warmup + cosine decay, a progress "
    "bar with loss / accuracy / tokens per second (a progress line every --progress-seconds when the output is not "
    "a terminal), periodic evaluation on a fixed held-out set, orbax checkpoints and --resume. Checkpoints, the run "
    "config and the finished model (HF safetensors layout; load it with xlstm_jax.from_pretrained or `xlstm-jax "
    "generate OUTPUT_DIR`) go to --output-dir, by default a new runs/mqar-<timestamp>. "
    "The defaults (D=64, 2 blocks, 4 heads; vocab 17 = filler + 8 keys + 8 values, 4 key-value pairs, 32 tokens; "
    "3000 steps of 32 sequences at peak lr 1e-3) took 80 to 91 s on a 2-core CPU with nothing else running and "
    "reached held-out recall accuracy 1.000 (chance 0.125) for seeds 0-4, on one thread and on two: MQAR starts "
    "with open input gates and one short-memory head (--igate-bias-init, --fgate-bias-init-range), so the recall "
    "circuit forms within about 500 steps (docs/training.md)."
)

def parse_separator(text: str) -> str:
    """--doc-separator: the string with the escapes \\n, \\t, \\r and \\\\ read as the characters."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    value = re.sub(r"\\([ntr\\])", lambda match: escapes[match[1]], text)
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def flag(field: str) -> str:
    """The `xlstm-jax train` option that sets a `TrainConfig` field."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def fail(name: str, reason: str) -> int:
    """Print `error: NAME: reason` as one line to stderr; returns the exit status 2."""
    print(f"error: {name}: {' '.join(reason.split())}", file=sys.stderr)
    return 2


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `xlstm-jax train`. Only the options given reach the namespace (every default is
    `argparse.SUPPRESS`; the help shows `TrainConfig`'s), so that `TrainConfig` derives what follows --steps and
    the task, and a --resume takes the stored run's settings for every option not given."""
    d = _DEFAULTS

    def option(group, *names, field=None, help, **kwargs):
        field = field or names[0].lstrip("-").replace("-", "_")
        if "(default:" not in help and kwargs.get("action") not in ("store_true", "store_false"):
            help += f" (default: {d[field]})"
        group.add_argument(*names, dest=field, default=argparse.SUPPRESS, help=help, **kwargs)

    data = parser.add_argument_group("data (default: MQAR generated on the fly)")
    option(data, "--data", nargs="+", metavar="PATH",
           help="train a language model on these files, all of one kind: token files (.npy, or raw .bin of "
                "--token-dtype; memory-mapped) or text (.txt: one document per file, or see --doc-separator; "
                ".jsonl: one {\"text\": ...} per line) with --tokenizer; packed into --seq-len rows with document "
                "boundaries as segment ids (default: MQAR)")
    option(data, "--tokenizer", metavar="JSON",
           help="a tokenizers tokenizer.json: needed for text data, optional with token files; the exported model "
                "carries it (default: none)")
    option(data, "--doc-separator", metavar="STR", type=parse_separator,
           help="split each .txt file into documents at this exact string (\\n, \\t, \\r and \\\\ are "
                "read as escapes, e.g. '\\n\\n' where a line is empty); text is kept as it is, whitespace included "
                "(default: none, one document per file)")
    option(data, "--token-dtype", choices=("uint16", "uint32"), help="item type of .bin token files")
    option(data, "--eos-id", type=int,
           help="end-of-document token: it ends a document in token files, and is appended to each text document "
                "(pass the tokenizer's end-of-text id, e.g. 0 for <|endoftext|>, so the model learns where "
                "documents end and generation stops there); the exported config's eos id (default: none; a token "
                "file is then one document)")
    option(data, "--eval-fraction", type=float, help="share of the packed rows held out for evaluation (the last ones)")
    task = parser.add_argument_group("task (MQAR)")
    option(task, "--vocab-size", type=int,
           help="tokens (default: 17 for MQAR = filler, keys, values; with --data the tokenizer's, or the token "
                "files' largest id + 1)")
    option(task, "--seq-len", type=int, help="sequence length S")
    option(task, "--num-kv-pairs", type=int, help="key-value pairs per sequence")
    option(task, "--num-queries", type=int, help="recall queries per sequence (default: as many as fit)")
    model = parser.add_argument_group("model")
    option(model, "--embedding-dim", type=int, help="model width D")
    option(model, "--num-heads", type=int, help="mLSTM heads per block")
    option(model, "--num-blocks", type=int, help="mLSTM blocks")
    option(model, "--igate-bias-init", type=float,
           help="input-gate bias at initialisation (default: 0 for MQAR, -10 as xLSTM-7B for --data)")
    option(model, "--fgate-bias-init-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
           help="forget-gate biases at initialisation, spread evenly over the heads (default: -2 4 for MQAR: one "
                "short-memory head for the previous-token lookup; 3 6 as xLSTM-7B for --data)")
    option(model, "--weight-mode", metavar="{single,fused}",
           help="the projections as one matmul each (single, xLSTM-7B's layout) or one per group: q|k|v|o, the "
                "two gates, the FFN's gate|up (fused: fewer, larger matmuls, 1-2%% slower on an H100); the same "
                "function, exported in its mode")
    option(model, "--backend", metavar="NAME",
           help="mLSTM backend (names: README or `xlstm-jax doctor`); auto: the Triton kernel on a CUDA GPU, "
                "native_chunkwise elsewhere")
    option(model, "--chunk-size", type=int,
           help="chunk size of chunkwise backends, a power of two (default: the backend's, 64)")
    option(model, "--dtype", field="compute_dtype", choices=("auto", "float32", "bfloat16", "float16"),
           help="matmul dtype (auto: bfloat16 on GPU, float32 on CPU)")
    opt = parser.add_argument_group("optimization")
    option(opt, "--steps", type=int,
           help="total optimizer steps; on --resume a new total extends (or shortens) the run: the learning rate "
                "goes on from where it is along a new cosine to its floor at the new end")
    option(opt, "--batch-size", type=int, help="sequences per step")
    option(opt, "--lr", field="learning_rate", type=float, help="peak learning rate")
    option(opt, "--warmup-steps", type=int, help="linear warmup steps, below --steps (default: min(100, steps // 10))")
    option(opt, "--min-lr-ratio", type=float, help="final lr / peak lr")
    option(opt, "--weight-decay", type=float, help="AdamW weight decay on kernels")
    option(opt, "--clip-norm", type=float, help="global gradient-norm clip")
    option(opt, "--seed", type=int, help="seed of the initialisation and the data")
    dist = parser.add_argument_group("devices and hosts (docs/distributed.md)")
    option(dist, "--mesh", metavar="AXES",
           help="device mesh over data, fsdp, tensor and sequence, e.g. data=2,fsdp=2,tensor=2, sizes multiplying "
                "to the device count (default: one device)")
    option(dist, "--remat", nargs="?", const="block", metavar="{none,block,dots}",
           help="what each block keeps for the backward: none recomputes nothing; block (also --remat alone) keeps "
                "only the block's input and recomputes the block (memory of one block's activations, about one "
                "more forward pass of compute); dots keeps the projections' outputs and recomputes the norms, "
                "gates, activations and the mLSTM cell")
    option(dist, "--loss", metavar="{plain,fused}",
           help="the training and evaluation loss: plain computes the (batch x seq-len, vocab) float32 logits, "
                "fused (the default) the same cross-entropy in vocabulary blocks without storing them (less memory, faster)")
    dist.add_argument("--coordinator", default=argparse.SUPPRESS, metavar="HOST:PORT",
                      help="several processes: process 0's address, with --num-processes and --process-id "
                           "(default: from SLURM / Open MPI when the job has several processes, else one process)")
    dist.add_argument("--num-processes", type=int, default=argparse.SUPPRESS,
                      help="processes in the job (default: as --coordinator)")
    dist.add_argument("--process-id", type=int, default=argparse.SUPPRESS,
                      help="this process, 0-based (default: as --coordinator)")
    run = parser.add_argument_group("evaluation, checkpoints, output")
    option(run, "--eval-every", type=int, help="steps between evaluations (default: min(1000, steps // 4))")
    option(run, "--eval-batches", type=int, help="held-out batches per evaluation")
    option(run, "--output-dir",
           help="checkpoints, run config and the exported model; must not hold a run unless --resume (default: a "
                "new runs/mqar-<timestamp>, or runs/lm-<timestamp> with --data)")
    option(run, "--checkpoint-every", type=int, help="steps between checkpoints (default: --eval-every)")
    option(run, "--keep-checkpoints", type=int, help="newest checkpoints kept")
    option(run, "--resume", action="store_true",
           help="continue the run in --output-dir from its newest intact checkpoint, with its stored settings "
                "(options given must agree with them, except --steps, the evaluation, checkpoint and logging "
                "cadence, and where and how it runs: --backend, --chunk-size, --dtype, --mesh, --remat, --loss); "
                "damaged checkpoints are moved to OUTPUT_DIR/damaged-checkpoints")
    option(run, "--log-every", type=int, help="steps between metrics.jsonl records (and progress-bar updates)")
    option(run, "--no-progress", field="progress", action="store_false", help="no progress bar or progress lines")
    option(run, "--progress-seconds", type=float,
           help="seconds between progress lines when the output is not a terminal (the first comes after step 1)")
    run.add_argument("--json", dest="json_out", action="store_true", default=argparse.SUPPRESS,
                     help="print the final result as JSON")


def run_train(args: argparse.Namespace) -> int:
    """Run `xlstm-jax train`; returns 0, or 2 for a setting that cannot work (checked before any compilation)."""
    from xlstm_jax.train import distributed
    from xlstm_jax.train.guards import RunError

    fields = {name: value for name, value in vars(args).items() if name in _DEFAULTS}
    if fields.get("fgate_bias_init_range") is not None:
        fields["fgate_bias_init_range"] = tuple(fields["fgate_bias_init_range"])
    if "output_dir" not in fields and not fields.get("resume"):
        kind = "mqar" if fields.get("data") is None else "lm"
        fields["output_dir"] = os.path.join("runs", time.strftime(f"{kind}-%Y%m%d-%H%M%S"))
    try:
        distributed.initialize(*(getattr(args, name, None) for name in ("coordinator", "num_processes",
                                                                           "process_id")))
    except ValueError as err:
        field, _, reason = str(err).partition(": ")
        return fail(flag(field), reason)
    try:
        if fields.get("data") is not None:
            fields["data"] = tuple(fields["data"])
        if fields.pop("resume", False):
            if "output_dir" not in fields:
                raise ConfigError("resume", "needs the output directory of the run to continue (--output-dir).")
            config = TrainConfig.resumed(**fields)
        else:
            config = TrainConfig(**fields)
        from xlstm_jax.train.loop import train

        result = train(config)
    except ConfigError as err:
        return fail(flag(err.field), err.reason)
    except RunError as err:  # diverged, interrupted, a write that failed: the run says what to do
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_status
    import jax

    if jax.process_index() != 0:  # process 0 reports for the job
        return 0
    summary = {
        "step": result.step, "eval_loss": result.eval_loss, "eval_perplexity": result.eval_perplexity,
        "eval_accuracy": result.eval_accuracy, "chance_accuracy": result.chance_accuracy,
        "tokens_per_second": result.tokens_per_second, "mfu": result.mfu, "wall_seconds": result.wall_seconds,
        "output_dir": config.output_dir,
    }
    if getattr(args, "json_out", False):
        print(json.dumps(summary))
        return 0
    chance = "" if result.chance_accuracy is None else f" (chance {result.chance_accuracy:.4f})"
    print(f"done: step {result.step}, eval accuracy {result.eval_accuracy:.4f}{chance}, eval loss "
          f"{result.eval_loss:.4f} (perplexity {result.eval_perplexity:.3f}), {result.tokens_per_second:,.0f} "
          f"tokens/s, {result.wall_seconds:.1f} s")
    out = config.output_dir
    print(f"checkpoints: {os.path.join(out, 'checkpoints')}\nmodel: {os.path.join(out, 'model')}\n"
          f"sample from it: xlstm-jax generate {out}")
    if config.data is not None:
        print(f"evaluate it: xlstm-jax eval {out}")
    return 0
