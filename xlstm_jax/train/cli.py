"""argparse wiring for `xlstm-jax train` and `xlstm-jax generate`.

`add_train_arguments(parser)` / `run_train(args)` and `add_generate_arguments(parser)` / `run_generate(args)`;
`run_*` return the process exit status. Building the parsers imports neither flax, optax nor orbax.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from xlstm_jax.train.config import TrainConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

TRAIN_DESCRIPTION = (
    "Train an xLSTM-7B-architecture language model (any size) on multi-query associative recall (MQAR) generated "
    "on the fly: AdamW with weight decay on kernels, gradient clipping, linear warmup + cosine decay, a progress "
    "bar with loss / accuracy / tokens per second, periodic evaluation on a fixed held-out set, orbax checkpoints "
    "and --resume. With --output-dir the finished model is also exported to OUTPUT_DIR/model in the HF "
    "safetensors layout (load it with xlstm_jax.from_pretrained or `xlstm-jax generate OUTPUT_DIR`). "
    "The defaults (D=64, 2 blocks, 2 heads; vocab 17 = filler + 8 keys + 8 values, 4 key-value pairs, 32 tokens; "
    "12000 steps of 32 sequences) took 244 s on a 2-core CPU (about 51k tokens/s) and reached held-out recall "
    "accuracy 1.000 (chance 0.125). Until about step 8000 the accuracy sits near 0.4 (the model only knows the "
    "answer is one of the values in the context); then the recall circuit forms and it climbs to 1.0."
)

GENERATE_DESCRIPTION = (
    "Generate tokens with an xLSTM-7B-architecture model: one chunkwise prefill of the (left-padded) prompts that "
    "returns the mLSTM states, then one-token recurrent steps inside a single jitted loop; greedy, temperature, "
    "top-k, top-p, stop tokens. MODEL is a safetensors checkpoint directory (HF `xLSTM-7b` or plain `xlstm_large` "
    "layout) or the --output-dir of `xlstm-jax train`, which without --prompt-ids runs an MQAR recall demo."
)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `xlstm-jax train` (defaults from `xlstm_jax.train.TrainConfig`)."""
    d = _DEFAULTS
    task = parser.add_argument_group("task (MQAR)")
    task.add_argument("--vocab-size", type=int, default=d["vocab_size"], help="tokens: filler, keys, values")
    task.add_argument("--seq-len", type=int, default=d["seq_len"], help="sequence length S")
    task.add_argument("--num-kv-pairs", type=int, default=d["num_kv_pairs"], help="key-value pairs per sequence")
    task.add_argument("--num-queries", type=int, default=d["num_queries"],
                      help="recall queries per sequence (default: as many as fit)")
    model = parser.add_argument_group("model")
    model.add_argument("--embedding-dim", type=int, default=d["embedding_dim"])
    model.add_argument("--num-heads", type=int, default=d["num_heads"])
    model.add_argument("--num-blocks", type=int, default=d["num_blocks"])
    model.add_argument("--igate-bias-init", type=float, default=d["igate_bias_init"],
                       help="input-gate bias at initialisation (xLSTM-7B: -10)")
    from xlstm_jax.mlstm.api import BACKEND_NAMES

    model.add_argument("--backend", choices=BACKEND_NAMES, default=d["backend"],
                       help="mLSTM backend; auto: the Triton kernel on a CUDA GPU, native_chunkwise elsewhere")
    model.add_argument("--chunk-size", type=int, default=d["chunk_size"], help="chunk size of chunkwise backends")
    model.add_argument("--dtype", dest="compute_dtype", choices=("auto", "float32", "bfloat16", "float16"),
                       default=d["compute_dtype"], help="matmul dtype (auto: bfloat16 on GPU, float32 on CPU)")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--steps", type=int, default=d["steps"], help="total optimizer steps")
    opt.add_argument("--batch-size", type=int, default=d["batch_size"])
    opt.add_argument("--lr", dest="learning_rate", type=float, default=d["learning_rate"], help="peak learning rate")
    opt.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    opt.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"], help="final lr / peak lr")
    opt.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    opt.add_argument("--clip-norm", type=float, default=d["clip_norm"], help="global gradient-norm clip")
    opt.add_argument("--seed", type=int, default=d["seed"])
    run = parser.add_argument_group("evaluation, checkpoints, output")
    run.add_argument("--eval-every", type=int, default=d["eval_every"])
    run.add_argument("--eval-batches", type=int, default=d["eval_batches"])
    run.add_argument("--output-dir", default=d["output_dir"], help="checkpoints, run config and the exported model")
    run.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                     help="steps between checkpoints (default: --eval-every)")
    run.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"])
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    run.add_argument("--json", dest="json_out", action="store_true", help="print the final result as JSON")


def run_train(args: argparse.Namespace) -> int:
    """Run `xlstm-jax train`; returns 0, or 2 for an invalid configuration."""
    from xlstm_jax.train.loop import train

    fields = {name: getattr(args, name) for name in _DEFAULTS if hasattr(args, name)}
    try:
        config = TrainConfig(**fields)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    result = train(config)
    summary = {
        "step": result.step, "eval_loss": result.eval_loss, "eval_accuracy": result.eval_accuracy,
        "chance_accuracy": result.chance_accuracy, "tokens_per_second": result.tokens_per_second,
        "wall_seconds": result.wall_seconds,
    }
    if getattr(args, "json_out", False):
        print(json.dumps(summary))
    else:
        print(f"done: step {result.step}, eval accuracy {result.eval_accuracy:.4f} (chance "
              f"{result.chance_accuracy:.4f}), eval loss {result.eval_loss:.4f}, "
              f"{result.tokens_per_second:,.0f} tokens/s, {result.wall_seconds:.1f} s")
    return 0


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `xlstm-jax generate`."""
    parser.add_argument("model", help="checkpoint directory (HF or plain xlstm_large safetensors layout), or the "
                                      "--output-dir of `xlstm-jax train` (its model/ export is used)")
    parser.add_argument("--prompt-ids", action="append", metavar="IDS",
                        help="prompt token ids, space- or comma-separated; repeat for a batch. Without it, a "
                             "training directory runs an MQAR recall demo")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--stop-ids", default="", help="stop token ids, space- or comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="matmul dtype (default: the config's, bfloat16)")
    from xlstm_jax.mlstm.api import BACKEND_NAMES

    parser.add_argument("--backend", choices=BACKEND_NAMES, default=None, help="prefill backend")
    parser.add_argument("--step-backend", choices=BACKEND_NAMES, default=None,
                        help="backend of the one-token steps (default native_recurrent)")
    parser.add_argument("--num-examples", type=int, default=4, help="MQAR demo: examples to show")


def _ids(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


def run_generate(args: argparse.Namespace) -> int:
    """Run `xlstm-jax generate`; returns 0, or 2 for bad input."""
    from xlstm_jax.models.xlstm_large.checkpoint import from_pretrained
    from xlstm_jax.models.xlstm_large.generate import generate
    from xlstm_jax.train.checkpoints import read_run_config

    path = args.model
    run_config = read_run_config(path) if os.path.isdir(path) else None
    if run_config is not None:
        path = os.path.join(path, "model")
    try:
        model = from_pretrained(path, args.dtype, backend=args.backend)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}")
        return 2
    stop = _ids(args.stop_ids)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_tokens=stop,
                    seed=args.seed, step_backend=args.step_backend)
    if args.prompt_ids:
        prompts = [_ids(text) for text in args.prompt_ids]
        try:
            out = generate(model, prompts, max_new_tokens=args.max_new_tokens, **sampling)
        except ValueError as err:
            print(f"error: {err}")
            return 2
        for prompt, tokens, length in zip(prompts, out.tokens, out.lengths):
            print(f"prompt {prompt} -> {tokens[:length].tolist()}")
        return 0
    if run_config is None:
        print("error: --prompt-ids is required unless MODEL is an `xlstm-jax train` output directory.")
        return 2
    return _mqar_demo(model, run_config, args.num_examples, sampling)


def _mqar_demo(model, run_config: dict, num_examples: int, sampling: dict) -> int:
    """Cut MQAR sequences after their first query key and let the model recall the value."""
    import jax
    import numpy as np

    from xlstm_jax.models.xlstm_large.generate import generate
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
