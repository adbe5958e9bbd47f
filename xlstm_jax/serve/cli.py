"""`xlstm-jax serve MODEL_DIR`: load a model (HF layout, ours or `transformers`', or an `xlstm-jax train` output
directory) with its tokenizer and chat template, compile the engine's shapes, and serve the OpenAI-compatible API
with uvicorn until SIGINT / SIGTERM (which drain the running requests first)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from xlstm_jax.generate_cli import positive_int
from xlstm_jax.train.cli import fail

SERVE_DESCRIPTION = (
    "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions when the tokenizer "
    "config has a chat template, streaming with server-sent events, /v1/models, /health, /metrics) with continuous "
    "batching: a fixed pool of --max-slots recurrent states on the device, one decode step for all of them, long "
    "prompts prefilled in chunks between steps, and states after seen prefixes reused (docs/serving.md). MODEL is "
    "a safetensors checkpoint directory (HF `xLSTM-7b` or plain `xlstm_large` layout) or the --output-dir of "
    "`xlstm-jax train`; text needs its tokenizer.json (token ids only without one)."
)


def _megabytes(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"must be in [0, 65536), got {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `xlstm-jax serve`."""
    parser.add_argument("model", help="checkpoint directory (HF or plain xlstm_large safetensors layout), or the "
                                      "--output-dir of `xlstm-jax train` (its model/ export is used)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=_port, default=8000, help="port to listen on")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name of the API (default: the directory's name)")
    parser.add_argument("--max-slots", type=positive_int, default=16,
                        help="sequences decoded together: the state slots held on the device")
    parser.add_argument("--max-queue", type=positive_int, default=256,
                        help="sequences that may wait for a slot; beyond it requests get 429")
    parser.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the slots' C and n states (bfloat16 halves the pool; m stays float32)")
    parser.add_argument("--max-new-tokens-limit", type=positive_int, default=4096,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=32768,
                        help="the longest prompt accepted, in tokens")
    parser.add_argument("--prefill-chunk", type=positive_int, default=256,
                        help="prompt tokens prefilled between two decode steps (the compiled prefill lengths are "
                             "the powers of two below it and itself; --max-slots + it rows share each matmul)")
    parser.add_argument("--prefix-cache-mb", type=_megabytes, default=1024.0,
                        help="device memory for states after seen prompt prefixes (0: no prefix reuse)")
    parser.add_argument("--mesh", metavar="AXES",
                        help="serve on a device mesh: data=D,tensor=T with D*T the device count (slots split over "
                             "data, heads and states over tensor; docs/serving.md)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=argparse.SUPPRESS,
                        help="matmul dtype (default: the checkpoint's)")


def load_served(path: str, *, name: str | None = None, dtype: str | None = None, max_prompt_tokens: int = 32768,
                max_new_tokens_limit: int = 4096, weight_mode: str = "fused") -> tuple[Any, Any]:
    """(model, `Served`) for a model directory: weights in `weight_mode` (the fused layout: fewer matmuls per
    decode step; "single" where heads are split over devices), the tokenizer and chat template saved with it, its
    end-of-text token as the default stop. ValueError / OSError for a directory that does not load."""
    from xlstm_jax.models.xlstm_large.checkpoint import from_pretrained, training_export
    from xlstm_jax.models.xlstm_large.tokenizer import end_of_text_id, load_tokenizer
    from xlstm_jax.serve.app import Served
    from xlstm_jax.serve.text import ChatTemplate

    directory = training_export(os.fspath(path))
    tokenizer = load_tokenizer(directory)
    eos = None if tokenizer is None else end_of_text_id(tokenizer, directory)
    model = from_pretrained(directory, dtype, weight_mode=weight_mode)
    template = ChatTemplate.load(directory) if tokenizer is not None else None
    served = Served(name=name or os.path.basename(os.path.abspath(os.fspath(path))), tokenizer=tokenizer,
                    stop_token_ids=() if eos is None else (eos,), chat_template=template,
                    max_prompt_tokens=max_prompt_tokens, max_new_tokens_limit=max_new_tokens_limit)
    return model, served


def run_serve(args: argparse.Namespace) -> int:
    """Run `xlstm-jax serve`; returns 0 after a shutdown, 2 for a model that does not load or a mesh that does
    not fit."""
    from xlstm_jax.serve.mesh import serving_mesh
    from xlstm_jax.train.mesh import parse_mesh

    split_heads = False
    if args.mesh is not None:
        try:
            split_heads = parse_mesh(args.mesh)["tensor"] > 1
        except ValueError as err:
            return fail("--mesh", str(err))
    try:
        model, served = load_served(args.model, name=args.served_model_name, dtype=getattr(args, "dtype", None),
                                    max_prompt_tokens=args.max_prompt_tokens,
                                    max_new_tokens_limit=args.max_new_tokens_limit,
                                    weight_mode="single" if split_heads else "fused")
    except (ValueError, OSError) as err:
        return fail("MODEL", f"cannot load {args.model!r}: {err}")
    mesh = None
    if args.mesh is not None:
        try:
            mesh = serving_mesh(args.mesh, num_heads=model.config.num_heads, max_slots=args.max_slots)
        except ValueError as err:
            return fail("--mesh", str(err))
    import uvicorn

    from xlstm_jax.serve.app import create_app
    from xlstm_jax.serve.engine import Engine

    engine = Engine(model, max_slots=args.max_slots, max_queue=args.max_queue, state_dtype=args.state_dtype,
                    prefill_chunk=args.prefill_chunk, prefix_cache_mb=args.prefix_cache_mb, mesh=mesh)
    print(f"compiling the decode step ({args.max_slots} slots) and {len(engine.buckets)} prefill lengths ...",
          flush=True)
    engine.warm_up()
    text = "text and token ids" if served.tokenizer is not None else "token ids only (no tokenizer)"
    chat = "with" if served.chat_template is not None else "without"
    print(f"serving {served.name!r} ({text}, {chat} chat) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(engine, served), host=args.host, port=args.port, log_level="info")
    return 0
