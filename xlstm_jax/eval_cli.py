"""`xlstm-jax eval`: loss, perplexity, next-token accuracy and bits per byte of a model on text or token files,
packed into rows as `xlstm-jax train --data` packs them (`xlstm_jax.train.data`), and evaluated by the training
job's own evaluation step, on one device or a device mesh."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from xlstm_jax.generate_cli import add_weights_argument, positive_int, weights_error
from xlstm_jax.train.cli import fail, parse_separator

EVAL_DESCRIPTION = (
    "Evaluate an xLSTM-7B-architecture model on text or token files: loss (nats per scored token), perplexity, "
    "next-token accuracy and bits per byte (text only: the loss summed over the scored tokens, in bits, per byte of "
    "the UTF-8 text they cover). The files are packed into rows of --seq-len as `xlstm-jax train --data` packs "
    "them, with document boundaries as segment ids, and every row is evaluated. MODEL is a checkpoint directory or "
    "the --output-dir of `xlstm-jax train`; for a training directory without --data, the run's own held-out rows "
    "are evaluated as the run evaluated them (the same numbers as its last evaluation in metrics.jsonl), and with "
    "--data its data settings are the defaults."
)
DATA_FLAGS = ("tokenizer", "token_dtype", "eos_id", "doc_separator", "seq_len", "batch_size", "max_batches")
SEQ_LEN, BATCH_SIZE = 512, 8  # with --data, for a model directory that is not a training run


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `xlstm-jax eval`."""
    parser.add_argument("model", help="checkpoint directory (HF or plain xlstm_large safetensors layout), or the "
                                      "--output-dir of `xlstm-jax train`")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="files to evaluate, all of one kind: text (.txt, .jsonl) or token files (.npy, .bin); "
                             "every row is evaluated (default: a training directory's held-out rows)")
    parser.add_argument("--tokenizer", metavar="JSON", default=argparse.SUPPRESS,
                        help="tokenizer.json for text (default: the one saved with the model)")
    parser.add_argument("--token-dtype", choices=("uint16", "uint32"), default=argparse.SUPPRESS,
                        help="item type of .bin token files (default: the run's, else uint16)")
    parser.add_argument("--eos-id", type=int, default=argparse.SUPPRESS,
                        help="end-of-document token, as `xlstm-jax train --eos-id` (default: the run's, else none)")
    parser.add_argument("--doc-separator", type=parse_separator, metavar="STR", default=argparse.SUPPRESS,
                        help="split .txt files into documents at this string, as `xlstm-jax train "
                             "--doc-separator` (default: the run's, else one document per file)")
    parser.add_argument("--seq-len", type=positive_int, default=argparse.SUPPRESS,
                        help=f"tokens per row (default: the run's, else {SEQ_LEN})")
    parser.add_argument("--batch-size", type=positive_int, default=argparse.SUPPRESS,
                        help=f"rows per batch (default: the run's, else {BATCH_SIZE})")
    parser.add_argument("--max-batches", type=positive_int, default=argparse.SUPPRESS,
                        help="evaluate only the first N batches (default: all)")
    parser.add_argument("--mesh", metavar="AXES", default=argparse.SUPPRESS,
                        help="device mesh over data, fsdp, tensor and sequence, as `xlstm-jax train --mesh` "
                             "(default: one device)")
    parser.add_argument("--dtype", default=argparse.SUPPRESS, choices=("float32", "bfloat16", "float16"),
                        help="matmul dtype (default: the checkpoint's)")
    add_weights_argument(parser, "evaluate")
    parser.add_argument("--backend", default=argparse.SUPPRESS, metavar="NAME",
                        help="mLSTM backend (default: auto)")
    parser.add_argument("--json", dest="json_out", action="store_true", help="print the metrics as one JSON object")


def _plan(args: argparse.Namespace, run_config: dict | None, model_dir: str) -> tuple[Any, int, int, int | None]:
    """(DataSpec, seq_len, batch_size, max_batches) of the evaluation; ValueError (flag, reason) for settings that
    cannot be used."""
    from xlstm_jax.models.xlstm_large.tokenizer import TOKENIZER_FILE
    from xlstm_jax.train.data import DataSpec

    given = {name: getattr(args, name) for name in DATA_FLAGS if hasattr(args, name)}
    run = run_config or {}
    if args.data is None:
        if run_config is None:
            raise ValueError("--data", "name the files to evaluate (MODEL is not an `xlstm-jax train` output "
                                       "directory, whose held-out rows would be the default).")
        if run_config.get("data") is None:
            raise ValueError("--data", "the run trained on MQAR, which has no held-out files; name files to "
                                       "evaluate.")
        if given:
            name = next(iter(given))
            raise ValueError("--" + name.replace("_", "-"), "applies with --data; without it the run's held-out "
                                                            "rows are evaluated with the run's settings.")
    saved = os.path.join(model_dir, TOKENIZER_FILE)  # the run's tokenizer, wherever its file went since
    saved = saved if os.path.isfile(saved) else None
    if args.data is None:
        fields = ("token_dtype", "eos_id", "eval_fraction", "doc_separator")
        spec = DataSpec(tuple(run_config["data"]), tokenizer=saved or run_config.get("tokenizer"),
                        **{name: run_config[name] for name in fields if name in run})
        return spec, run_config["seq_len"], run_config["batch_size"], run_config["eval_batches"]
    text = any(path.lower().endswith(".txt") for path in args.data)  # what a run's separator would split
    spec = DataSpec(tuple(args.data), tokenizer=given.get("tokenizer", saved),
                    token_dtype=given.get("token_dtype", run.get("token_dtype", "uint16")),
                    eos_id=given.get("eos_id", run.get("eos_id")),
                    doc_separator=given.get("doc_separator", run.get("doc_separator") if text else None))
    if spec.eos_id is not None and spec.eos_id < 0:
        raise ValueError("--eos-id", f"must be a token id >= 0, got {spec.eos_id}.")
    seq_len = given.get("seq_len", run.get("seq_len", SEQ_LEN))
    return spec, seq_len, given.get("batch_size", run.get("batch_size", BATCH_SIZE)), given.get("max_batches")


def run_eval(args: argparse.Namespace) -> int:
    """Run `xlstm-jax eval`; returns 0, or 2 for bad input (checked before the model is evaluated)."""
    from xlstm_jax.models.xlstm_large.checkpoint import from_pretrained, training_export
    from xlstm_jax.train.checkpoints import read_run_config
    from xlstm_jax.train.config import ConfigError, check_backend

    try:
        if hasattr(args, "backend"):
            check_backend(args.backend, field="backend")
    except ConfigError as err:
        return fail("--backend", err.reason)
    weights = getattr(args, "weights", None)
    if (reason := weights_error(weights)) is not None:
        return fail("--weights", reason)
    try:
        run_config = read_run_config(args.model) if os.path.isdir(args.model) else None
        model_dir = training_export(args.model)
    except (ValueError, OSError) as err:
        return fail("MODEL", f"cannot load {args.model!r}: {err}")
    try:
        spec, seq_len, batch_size, max_batches = _plan(args, run_config, model_dir)
    except ValueError as err:
        return fail(*err.args)
    from xlstm_jax.train.mesh import parse_mesh

    try:
        sizes = parse_mesh(args.mesh) if hasattr(args, "mesh") else None
    except ValueError as err:
        return fail("--mesh", str(err))
    try:
        model = from_pretrained(model_dir, getattr(args, "dtype", None), backend=getattr(args, "backend", None))
    except (ValueError, OSError) as err:
        return fail("MODEL", f"cannot load {args.model!r}: {err}")
    if weights is not None:
        from xlstm_jax.models.xlstm_large.quantize import quantize

        model = quantize(model, weights, backend="xla")  # dequantize-then-matmul: any row count, shards on a mesh
    try:
        mesh = None if sizes is None else _mesh(sizes, model.config, seq_len, batch_size)
    except ValueError as err:
        return fail("--mesh", str(err))
    from xlstm_jax.train.batches import row_batches
    from xlstm_jax.train.data import load_corpus

    held_out = args.data is None
    try:
        corpus = load_corpus(spec, seq_len, model.config.vocab_size, training=held_out, byte_counts=True)
        first, count = (corpus.num_train_rows, corpus.num_eval_rows) if held_out else (0, corpus.num_rows)
        batches = row_batches(corpus, first, count, batch_size, max_batches, process_index=0, process_count=1)
    except ValueError as err:
        return fail("--data", str(err))
    metrics = _evaluate(model, batches.batches, mesh)
    rows = min(count, len(batches.batches) * batch_size)
    metrics.update(tokens=batches.num_tokens, rows=rows, seq_len=seq_len)
    if getattr(args, "json_out", False):
        print(json.dumps(metrics))
        return 0
    where = f"the held-out rows of {args.model}" if held_out else f"{len(spec.paths)} file(s)"
    bpb = "" if metrics["bits_per_byte"] is None else f", bits per byte {metrics['bits_per_byte']:.4f}"
    print(f"eval: {metrics['tokens']:,} tokens in {rows:,} rows of {seq_len} from {where}: loss {metrics['loss']:.4f}"
          f", perplexity {metrics['perplexity']:.3f}{bpb}, accuracy {metrics['accuracy']:.4f}")
    return 0


def _mesh(sizes: dict[str, int], model_config: Any, seq_len: int, batch_size: int) -> tuple[Any, dict[str, int]]:
    """The device mesh of --mesh's axis sizes, and the sizes (ValueError when they do not fit the devices, heads,
    rows or batch)."""
    import jax

    from xlstm_jax.train.mesh import BATCH, build_mesh, check_mesh

    check_mesh(sizes, devices=jax.device_count(), num_heads=model_config.num_heads, seq_len=seq_len)
    replicas = sizes[BATCH[0]] * sizes[BATCH[1]]
    if batch_size % replicas:
        raise ValueError(f"data x fsdp = {replicas} must divide the batch size {batch_size} (--batch-size).")
    return build_mesh(sizes), sizes


def _evaluate(model: Any, batches: list[dict[str, Any]], mesh: Any) -> dict[str, Any]:
    """loss, perplexity, accuracy (the training job's `evaluate`), bytes and bits_per_byte (None without byte
    counts) over the batches, on one device or on `mesh` ((mesh, sizes) or None)."""
    import contextlib

    import jax
    import numpy as np
    from flax import nnx

    from xlstm_jax.train.mesh import batch_sharding, param_shardings
    from xlstm_jax.train.steps import eval_step, evaluate

    graphdef, params = nnx.split(model)
    inputs = [{key: value for key, value in batch.items() if key != "bytes"} for batch in batches]
    if mesh is None:
        inputs = [jax.device_put(batch) for batch in inputs]
    else:
        mesh, sizes = mesh
        params = jax.device_put(params, param_shardings(params, mesh, sizes))
        inputs = [jax.device_put(batch, batch_sharding(mesh)) for batch in inputs]
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        result = evaluate(eval_step(graphdef, mesh is not None), params, inputs)
    scored = sum(float(np.sum(batch["mask"])) for batch in batches)
    counted = all("bytes" in batch for batch in batches)
    total_bytes = int(sum(np.sum(batch["bytes"] * batch["mask"]) for batch in batches)) if counted else None
    bits = result["eval_loss"] * scored / math.log(2)
    return {"loss": result["eval_loss"], "perplexity": result["eval_perplexity"],
            "accuracy": result["eval_accuracy"], "bits_per_byte": bits / total_bytes if total_bytes else None,
            "bytes": total_bytes}
