"""`xlstm-jax generate`: sample from a trained or pretrained xLSTM checkpoint (token ids, or the MQAR demo for a
training run of the main job)."""

from __future__ import annotations

import argparse
import os

from xlstm_jax.train.cli import fail, flag
from xlstm_jax.train.config import ConfigError, check_backend

GENERATE_DESCRIPTION = (
    "Generate tokens with an xLSTM-7B-architecture model: one chunkwise prefill of the (left-padded) prompts that "
    "returns the mLSTM states, then one-token recurrent steps inside a single jitted loop; greedy, temperature, "
    "top-k, top-p, stop tokens. MODEL is a safetensors checkpoint directory (HF `xLSTM-7b` or plain `xlstm_large` "
    "layout) or the --output-dir of `xlstm-jax train`, which without --prompt-ids runs an MQAR recall demo."
)



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
                             "each: fewer, larger matmuls, faster per token; docs/benchmarks.md) or "
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
