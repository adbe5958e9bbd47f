"""argparse wiring for `xlstm-jax train` and `xlstm-jax generate`.

`add_train_arguments(parser)` / `run_train(args)` and `add_generate_arguments(parser)` / `run_generate(args)`.
`run_*` return the exit status: 0, or 2 after printing one `error: FLAG: reason` line to stderr for a setting or
input that cannot work (`TrainConfig` checks the training flags, argparse types the generation flags).
Building the parsers imports neither jax, flax, optax nor orbax.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from xlstm_jax.train.config import ConfigError, TrainConfig, check_backend

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

GENERATE_DESCRIPTION = (
    "Generate tokens with an xLSTM-7B-architecture model: one chunkwise prefill of the (left-padded) prompts that "
    "returns the mLSTM states, then one-token recurrent steps inside a single jitted loop; greedy, temperature, "
    "top-k, top-p, stop tokens. MODEL is a safetensors checkpoint directory (HF `xLSTM-7b` or plain `xlstm_large` "
    "layout) or the --output-dir of `xlstm-jax train`, which without --prompt-ids runs an MQAR recall demo."
)


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
                "--token-dtype; memory-mapped) or text (.txt: documents separated by blank lines; .jsonl: one "
                "{\"text\": ...} per line) with --tokenizer; packed into --seq-len rows with document boundaries as "
                "segment ids (default: MQAR)")
    option(data, "--tokenizer", metavar="JSON", help="a tokenizers tokenizer.json for text data (default: none)")
    option(data, "--token-dtype", choices=("uint16", "uint32"), help="item type of .bin token files")
    option(data, "--eos-id", type=int,
           help="end-of-document token: it ends a document in token files, and is appended to each text document "
                "(default: none; a token file is then one document)")
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
    option(dist, "--remat", action="store_true",
           help="recompute each block in the backward instead of keeping its activations (memory of one block's "
                "activations, about one more forward pass of compute)")
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
                "cadence, and where it runs: --backend, --chunk-size, --dtype, --mesh, --remat); damaged "
                "checkpoints are moved to OUTPUT_DIR/damaged-checkpoints")
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
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if not 1 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be a positive int below 2^31, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2^63), got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids must be ints, space- or comma-separated, got {text!r}") from None


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `xlstm-jax generate`."""
    parser.add_argument("model", help="checkpoint directory (HF or plain xlstm_large safetensors layout), or the "
                                      "--output-dir of `xlstm-jax train` (its model/ export is used)")
    parser.add_argument("--prompt-ids", action="append", type=_ids, metavar="IDS",
                        help="prompt token ids, space- or comma-separated; repeat for a batch. Without it, a "
                             "training directory runs an MQAR recall demo")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=16, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=_positive_int, default=argparse.SUPPRESS,
                        help="sample from the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=_probability, default=argparse.SUPPRESS,
                        help="sample from the smallest set with this probability mass (default: 1, all)")
    parser.add_argument("--stop-ids", type=_ids, default=[], help="stop token ids, space- or comma-separated")
    parser.add_argument("--seed", type=_seed, default=0, help="sampling seed")
    parser.add_argument("--dtype", default=argparse.SUPPRESS, choices=("float32", "bfloat16", "float16"),
                        help="matmul dtype (default: the checkpoint's)")
    parser.add_argument("--weight-mode", choices=("single", "fused"), default="fused",
                        help="weight layout to decode with: fused (q|k|v|o, i|f and the FFN's gate|up as one matrix "
                             "each: fewer, larger matmuls; 5.6 against 8.0 ms per token for the 7B on an H200) or "
                             "single")
    parser.add_argument("--backend", default=argparse.SUPPRESS, metavar="NAME",
                        help="prefill backend (default: the checkpoint config's, auto)")
    parser.add_argument("--step-backend", default=argparse.SUPPRESS, metavar="NAME",
                        help="the one-token steps: mlstm_step (the fused Triton step kernel on a CUDA GPU, XLA "
                             "elsewhere) or any backend name (default: mlstm_step)")
    parser.add_argument("--num-examples", type=_positive_int, default=4, help="MQAR demo: examples to show")


def run_generate(args: argparse.Namespace) -> int:
    """Run `xlstm-jax generate`; returns 0, or 2 for bad input (a backend that cannot run here, a damaged or
    missing checkpoint, prompts the model cannot take)."""
    backend, step_backend = getattr(args, "backend", None), getattr(args, "step_backend", None)
    try:
        if backend is not None:
            check_backend(backend, field="backend")
        if step_backend not in (None, "mlstm_step"):
            check_backend(step_backend, field="step_backend")
    except ConfigError as err:
        return fail(flag(err.field), err.reason)

    from xlstm_jax.models.xlstm_large.checkpoint import from_pretrained
    from xlstm_jax.models.xlstm_large.generation import generate
    from xlstm_jax.train.checkpoints import read_run_config

    path = args.model
    try:
        run_config = read_run_config(path) if os.path.isdir(path) else None
        if run_config is not None:
            path = os.path.join(path, "model")
        model = from_pretrained(path, getattr(args, "dtype", None), backend=backend, weight_mode=args.weight_mode)
    except (ValueError, OSError) as err:  # a missing or damaged checkpoint
        return fail("MODEL", f"cannot load {args.model!r}: {err}")
    sampling = dict(temperature=args.temperature, top_k=getattr(args, "top_k", None),
                    top_p=getattr(args, "top_p", None), stop_tokens=args.stop_ids, seed=args.seed,
                    step_backend=step_backend)
    if args.prompt_ids:
        try:
            out = generate(model, args.prompt_ids, max_new_tokens=args.max_new_tokens, **sampling)
        except FloatingPointError as err:  # NaN logits: the model, not the input
            return fail("MODEL", str(err))
        except ValueError as err:  # the flags are checked by argparse; what is left is the prompts and sizes
            return fail("--max-new-tokens" if str(err).startswith("the generated tokens") else "--prompt-ids",
                        str(err))
        for prompt, tokens, length in zip(args.prompt_ids, out.tokens, out.lengths):
            print(f"prompt {prompt} -> {tokens[:length].tolist()}")
        return 0
    if run_config is None:
        return fail("--prompt-ids", "is required unless MODEL is an `xlstm-jax train` output directory.")
    return _mqar_demo(model, run_config, args.num_examples, sampling)


def _mqar_demo(model, run_config: dict, num_examples: int, sampling: dict) -> int:
    """Cut MQAR sequences after their first query key and let the model recall the value."""
    import jax
    import numpy as np

    from xlstm_jax.models.xlstm_large.generation import generate
    from xlstm_jax.train.mqar import MQARConfig, mqar_batch

    task = MQARConfig(vocab_size=run_config["vocab_size"], seq_len=run_config["seq_len"],
                      num_kv_pairs=run_config["num_kv_pairs"], num_queries=run_config.get("num_queries"))
    batch = jax.device_get(mqar_batch(jax.random.key(12345), task, num_examples))
    prompts, expected = [], []
    for row in range(num_examples):
        first = int(np.nonzero(batch["mask"][row])[0][0])
        prompts.append(batch["inputs"][row, : first + 1].tolist())
        expected.append(int(batch["targets"][row, first]))
    out = generate(model, prompts, max_new_tokens=1, **sampling)
    hits = 0
    for prompt, want, got in zip(prompts, expected, out.tokens[:, 0]):
        hits += int(got == want)
        pairs = " ".join(f"{k}:{v}" for k, v in zip(prompt[0:2 * task.num_kv_pairs:2],
                                                      prompt[1:2 * task.num_kv_pairs:2]))
        print(f"pairs {pairs} | query {prompt[-1]} -> {int(got)} (expected {want})")
    print(f"recalled {hits}/{num_examples}")
    return 0
