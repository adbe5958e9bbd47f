"""`xlstm-jax generate`: sample from a trained or pretrained xLSTM checkpoint: text with the tokenizer saved next to
the weights (`--prompt`, `--prompt-file`), token ids (`--prompt-ids`), and without a prompt a demo that fits the
directory (MQAR recall, the start of a document, or the start of the held-out data)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from xlstm_jax.train.cli import fail, flag
from xlstm_jax.train.config import ConfigError, check_backend

GENERATE_DESCRIPTION = (
    "Generate with an xLSTM-7B-architecture model: one chunkwise prefill of the (left-padded) prompts that returns "
    "the mLSTM states, then one-token recurrent steps inside a single jitted loop; greedy, temperature, top-k, "
    "top-p, stop tokens. MODEL is a safetensors checkpoint directory (HF `xLSTM-7b` or plain `xlstm_large` layout) "
    "or the --output-dir of `xlstm-jax train`. Text prompts need the tokenizer.json saved with the model; the "
    "continuation is printed as it is generated on a terminal, and generation stops at the tokenizer's end-of-text "
    "token. Without a prompt: the MQAR recall demo for an MQAR run, text from the start of a document for a model "
    "with a tokenizer, the start of the held-out data (token ids) for a run on token files."
)
WEIGHT_SCHEMES = ("int8", "fp8")  # --weights: xlstm_jax.kernels.quantized_matmul.SCHEMES, named without importing jax
TEXT_TOKENS, ID_TOKENS = 100, 16  # default --max-new-tokens for text and for token ids
HELD_OUT_PROMPT = 16  # tokens of the held-out data that prompt a run on token files without a tokenizer


def positive_int(text: str) -> int:
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


def add_weights_argument(parser: argparse.ArgumentParser, verb: str, note: str = "") -> None:
    """--weights SCHEME (absent: the checkpoint's float weights), shared by `generate` and `eval`; a command checks
    the value itself (`weights_error`) to fail with one error line before anything loads."""
    parser.add_argument("--weights", default=argparse.SUPPRESS, metavar="SCHEME",
                        help=f"{verb} with weight-only quantized projections and LM head: int8 or fp8 (e4m3), one "
                             f"scale per output channel{note} (docs/precision.md has the error; default: the "
                             "checkpoint's float weights)")


def weights_error(weights: str | None) -> str | None:
    """Why a --weights value is refused (one outside WEIGHT_SCHEMES), or None (absent or valid)."""
    if weights is None or weights in WEIGHT_SCHEMES:
        return None
    return (f"must be one of {list(WEIGHT_SCHEMES)} (leave it out for the checkpoint's float weights), got "
            f"{weights!r}.")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `xlstm-jax generate`."""
    parser.add_argument("model", help="checkpoint directory (HF or plain xlstm_large safetensors layout), or the "
                                      "--output-dir of `xlstm-jax train` (its model/ export is used)")
    parser.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a text prompt, encoded with the tokenizer saved with the model; repeat for a batch")
    parser.add_argument("--prompt-file", action="append", metavar="PATH",
                        help="a file whose whole text (UTF-8, as it is) is one prompt; repeatable, with --prompt")
    parser.add_argument("--prompt-ids", action="append", type=_ids, metavar="IDS",
                        help="prompt token ids, space- or comma-separated; repeat for a batch; prints token ids")
    parser.add_argument("--max-new-tokens", type=positive_int, default=argparse.SUPPRESS,
                        help=f"tokens to generate per prompt (default: {TEXT_TOKENS} for text, {ID_TOKENS} for "
                             "token ids)")
    parser.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=positive_int, default=argparse.SUPPRESS,
                        help="sample from the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=_probability, default=argparse.SUPPRESS,
                        help="sample from the smallest set with this probability mass (default: 1, all)")
    parser.add_argument("--stop-ids", type=_ids, default=argparse.SUPPRESS,
                        help="stop token ids, space- or comma-separated; '' for none (default: the tokenizer's "
                             "end-of-text token, none without a tokenizer)")
    parser.add_argument("--seed", type=_seed, default=0, help="sampling seed")
    parser.add_argument("--dtype", default=argparse.SUPPRESS, choices=("float32", "bfloat16", "float16"),
                        help="matmul dtype (default: the checkpoint's)")
    parser.add_argument("--weight-mode", choices=("single", "fused"), default="fused",
                        help="weight layout to decode with: fused (q|k|v|o, i|f and the FFN's gate|up as one matrix "
                             "each: fewer, larger matmuls, faster per token; docs/benchmarks.md) or "
                             "single")
    add_weights_argument(parser, "decode", ", half the bytes per token of bf16")
    parser.add_argument("--backend", default=argparse.SUPPRESS, metavar="NAME",
                        help="prefill backend (default: the checkpoint config's, auto)")
    parser.add_argument("--step-backend", default=argparse.SUPPRESS, metavar="NAME",
                        help="the one-token steps: mlstm_step (the fused Triton step kernel on a CUDA GPU, XLA "
                             "elsewhere) or any backend name (default: mlstm_step)")
    parser.add_argument("--num-examples", type=positive_int, default=4, help="MQAR demo: examples to show")


def _text_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt texts, then the texts of the --prompt-file files (OSError / ValueError name the file)."""
    texts = list(args.prompt or [])
    for path in args.prompt_file or []:
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                texts.append(fh.read())
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason})") from None
    return texts


def run_generate(args: argparse.Namespace) -> int:
    """Run `xlstm-jax generate`; returns 0, or 2 for bad input (a backend that cannot run here, a damaged or
    missing checkpoint, prompts the model cannot take, text prompts without a tokenizer), each checked before the
    model is loaded where it can be."""
    backend, step_backend = getattr(args, "backend", None), getattr(args, "step_backend", None)
    try:
        if backend is not None:
            check_backend(backend, field="backend")
        if step_backend not in (None, "mlstm_step"):
            check_backend(step_backend, field="step_backend")
    except ConfigError as err:
        return fail(flag(err.field), err.reason)
    weights = getattr(args, "weights", None)
    if (reason := weights_error(weights)) is not None:
        return fail("--weights", reason)
    if args.prompt_ids and (args.prompt or args.prompt_file):
        return fail("--prompt-ids", "give token ids or text prompts (--prompt, --prompt-file), not both.")
    try:
        texts = _text_prompts(args)
    except (OSError, ValueError) as err:
        return fail("--prompt-file", str(err))

    from xlstm_jax.models.xlstm_large.checkpoint import from_pretrained, training_export
    from xlstm_jax.models.xlstm_large.tokenizer import end_of_text_id, load_tokenizer
    from xlstm_jax.train.checkpoints import read_run_config

    try:
        run_config = read_run_config(args.model) if os.path.isdir(args.model) else None
        path = training_export(args.model)
        tokenizer = load_tokenizer(path) if os.path.isdir(path) else None
        eos = None if tokenizer is None else end_of_text_id(tokenizer, path)
    except (ValueError, OSError) as err:  # a damaged run config, an unfinished run, a tokenizer that does not load
        return fail("MODEL", f"cannot load {args.model!r}: {err}")
    if texts and tokenizer is None:
        return fail("--prompt", f"{args.model!r} has no tokenizer (tokenizer.json next to the weights), so text "
                                "cannot be encoded; pass --prompt-ids, or export the model with its tokenizer "
                                "(`xlstm-jax train --tokenizer`, or save_pretrained(..., tokenizer=...)).")
    prompts = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    empty = [number for number, ids in enumerate(prompts) if not ids]
    if empty:
        return fail("--prompt", f"prompt {empty[0]} encodes to no tokens; give some text.")
    try:
        model = from_pretrained(path, getattr(args, "dtype", None), backend=backend, weight_mode=args.weight_mode)
    except (ValueError, OSError) as err:  # a missing or damaged checkpoint
        return fail("MODEL", f"cannot load {args.model!r}: {err}")
    if weights is not None:
        from xlstm_jax.models.xlstm_large.quantize import quantize

        model = quantize(model, weights)
    stops = getattr(args, "stop_ids", None)
    sampling = dict(temperature=args.temperature, top_k=getattr(args, "top_k", None),
                    top_p=getattr(args, "top_p", None), seed=args.seed, step_backend=step_backend,
                    stop_tokens=stops if stops is not None else [] if eos is None else [eos])
    try:
        if args.prompt_ids:
            return _print_ids(model, args.prompt_ids, getattr(args, "max_new_tokens", ID_TOKENS), sampling)
        if run_config is not None and run_config.get("data") is None:
            return _mqar_demo(model, run_config, args.num_examples, sampling)
        if not prompts and tokenizer is not None:
            start = eos if eos is not None else model.config.bos_token_id
            if start is None:
                raise _Refused("--prompt", f"{args.model!r} names no end-of-text or begin token to start a "
                                           "document from; give a prompt.")
            texts, prompts = [""], [[start]]
            print(f"(no --prompt: generating from {tokenizer.id_to_token(start)}, the start of a new document)",
                  file=sys.stderr)
        if prompts:
            max_new_tokens = getattr(args, "max_new_tokens", TEXT_TOKENS)
            return _print_text(model, tokenizer, texts, prompts, max_new_tokens, sampling)
        if run_config is None:
            raise _Refused("--prompt-ids", "a prompt is required (--prompt with a tokenizer, or --prompt-ids) unless "
                                           "MODEL is an `xlstm-jax train` output directory.")
        return _held_out_demo(model, run_config, getattr(args, "max_new_tokens", ID_TOKENS), sampling)
    except _Refused as err:
        return fail(*err.args)


class _Refused(Exception):
    """(flag, reason) of an input that generation cannot take."""


def _generate(model: Any, prompts: list[list[int]], max_new_tokens: int, sampling: dict, prompt_flag: str,
              **extra: Any) -> Any:
    """`generate`; its errors are _Refused: NaN logits are the model's, ValueErrors the prompts' (`prompt_flag`) or
    the sizes'."""
    from xlstm_jax.models.xlstm_large.generation import generate

    try:
        return generate(model, prompts, max_new_tokens=max_new_tokens, **sampling, **extra)
    except FloatingPointError as err:
        raise _Refused("MODEL", str(err)) from None
    except ValueError as err:  # the flags are checked by argparse; what is left is the prompts and sizes
        raise _Refused("--max-new-tokens" if str(err).startswith("the generated tokens") else prompt_flag,
                       str(err)) from None


def _print_ids(model: Any, prompts: list[list[int]], max_new_tokens: int, sampling: dict) -> int:
    out = _generate(model, prompts, max_new_tokens, sampling, "--prompt-ids")
    for prompt, tokens, length in zip(prompts, out.tokens, out.lengths):
        print(f"prompt {prompt} -> {tokens[:length].tolist()}")
    return 0


def continuation(tokenizer: Any, prompt: list[int], generated: list[int]) -> str:
    """The text the generated ids add after the prompt's: decoded in the prompt's context (so a word split across the
    border, or the space between, comes out as in the whole), special tokens left out."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    whole = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(generated, skip_special_tokens=True)


class _Stream:
    """Prints the continuation of one prompt as the decode loop hands out its tokens (`Generator`'s on_token),
    holding back text that ends in an incomplete character."""

    def __init__(self, tokenizer: Any, prompt: list[int], stops: list[int]):
        self.tokenizer, self.prompt, self.stops = tokenizer, prompt, set(stops)
        self.generated: list[int] = []
        self.printed = ""
        self.stopped = False

    def __call__(self, tokens: Any) -> None:
        if self.stopped:
            return
        self.generated.append(int(tokens[0]))
        self.stopped = self.generated[-1] in self.stops
        self.show(continuation(self.tokenizer, self.prompt, self.generated))

    def show(self, text: str, last: bool = False) -> None:
        """Print what `text`, the continuation so far, adds to what is printed (held back while it ends in a
        replacement character, the first bytes of a character, unless it is the `last`)."""
        if text.startswith(self.printed) and (last or not text.endswith("\ufffd")):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def _print_text(model: Any, tokenizer: Any, texts: list[str], prompts: list[list[int]], max_new_tokens: int,
                sampling: dict) -> int:
    """Each prompt's text and its continuation (streamed on a terminal for one prompt); several prompts are
    printed one after another under a `=== i/n ===` line."""
    stream = _Stream(tokenizer, prompts[0], sampling["stop_tokens"]) \
        if len(prompts) == 1 and sys.stdout.isatty() else None
    if stream is not None:
        sys.stdout.write(texts[0])
    out = _generate(model, prompts, max_new_tokens, sampling, "--prompt", on_token=stream)
    for number, (text, prompt) in enumerate(zip(texts, prompts)):
        rest = continuation(tokenizer, prompt, out.tokens[number, :out.lengths[number]].tolist())
        if stream is not None:
            stream.show(rest, last=True)
            print()
            continue
        if len(prompts) > 1:
            print(f"=== {number + 1}/{len(prompts)} ===")
        print(text + rest)
    return 0


def _held_out_demo(model: Any, run_config: dict, max_new_tokens: int, sampling: dict) -> int:
    """For a run on token files without a tokenizer: continue the first tokens of its held-out data, as ids, next
    to what the data holds there."""
    from xlstm_jax.train.data import DataSpec, load_corpus

    fields = ("tokenizer", "token_dtype", "eos_id", "eval_fraction", "doc_separator")
    spec = DataSpec(tuple(run_config["data"]), **{name: run_config[name] for name in fields if name in run_config})
    try:
        corpus = load_corpus(spec, run_config["seq_len"], model.config.vocab_size)
    except ValueError as err:
        raise _Refused("--prompt-ids", f"the run has no tokenizer, and its data, whose held-out start would be the "
                                       f"prompt, cannot be read ({err}); pass --prompt-ids IDS.") from None
    row = corpus.row(corpus.num_train_rows)
    stream = [*row["inputs"].tolist(), int(row["targets"][-1])]
    length = min(HELD_OUT_PROMPT, len(stream) - 1)
    print("(no tokenizer in the export: token ids; the prompt is the start of the run's held-out data; train "
          "with --tokenizer to get text)", file=sys.stderr)
    _print_ids(model, [stream[:length]], max_new_tokens, sampling)
    print(f"the data goes on {stream[length:length + max_new_tokens]}")
    return 0


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
