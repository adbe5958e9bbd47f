"""Quality of weight-only int8 / fp8 decoding (`xlstm_jax.models.xlstm_large.quantize`; docs/precision.md,
"Weight-only int8 and fp8 decoding"), against the bf16 model:

1. random: the xLSTM-7B architecture at reduced size (--dim, --heads, --blocks; the 7B's head dims at the
   defaults, vocabulary 50304) with bf16 parameters and compute and random weights (the initialisation, with the
   zero-initialised output-gate and gate projections drawn like q, k, v, so every path carries signal). The bf16
   model continues random prompts greedily; then every variant (float32, bf16, int8 and fp8, each with and without
   the LM head quantized) runs the whole sequence (teacher forcing), and its logits over the continuation are
   compared with bf16's: max abs error, relative error ||dz|| / ||z|| (Frobenius), top-1 agreement. Each variant
   also continues the prompts greedily itself (the decode path): tokens equal to bf16's before the first
   difference, as a fraction of the continuation.
2. mqar: a model trained by `xlstm-jax train` (--run DIR, trained there with the default settings when DIR holds
   no run): held-out recall accuracy of each variant (64 x 32 sequences the run never saw) and the logit errors
   at the query positions.
On a CPU the quantized layers run the XLA path, whose product is that of the dequantized weights, as the GPU
kernel's is (up to float32 rounding): the figures hold for both.

    python scripts/measure_quantization.py --json quantization.json [--run /tmp/q] [--parts random mqar]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlstm_jax.bench.models import random_weights
from xlstm_jax.models.xlstm_large import from_pretrained, xLSTMLarge, xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.generation import Generator
from xlstm_jax.models.xlstm_large.quantize import quantize

BF16 = jnp.bfloat16


def variants(float32_model: xLSTMLarge) -> dict[str, xLSTMLarge]:
    """float32 (as given), bf16 (parameters and compute) and int8 / fp8 from bf16, with and without the LM head."""
    config = float32_model.config.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    bf16 = nnx.eval_shape(lambda: xLSTMLarge(config, rngs=nnx.Rngs(0)))
    nnx.update(bf16, jax.tree.map(lambda x: x.astype(BF16), nnx.state(float32_model)))
    out = {"float32": float32_model, "bf16": bf16}
    for scheme in ("int8", "fp8"):
        out[scheme] = quantize(bf16, scheme)
        out[f"{scheme}, LM head bf16"] = quantize(bf16, scheme, lm_head=False)
    return out


def forward(model: xLSTMLarge, tokens: np.ndarray) -> np.ndarray:
    """Logits (B, S, V) float32 of one jitted full pass."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, backend="native_chunkwise"))
    return np.asarray(run(state, jnp.asarray(tokens)), np.float32)


def margin(reference: np.ndarray) -> float:
    """The median gap between the largest and the second largest logit: how far a top-1 token is from flipping."""
    top = np.sort(reference, axis=-1)[..., -2:]
    return float(np.median(top[..., 1] - top[..., 0]))


def errors(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    diff = logits.astype(np.float64) - reference
    return {"max_abs": float(np.max(np.abs(diff))),
            "relative": float(np.linalg.norm(diff) / np.linalg.norm(reference)),
            "top1_agreement": float(np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)))}


def random_part(args) -> dict:
    config = xLSTMLargeConfig(embedding_dim=args.dim, num_heads=args.heads, num_blocks=args.blocks,
                              weight_mode="fused", compute_dtype="float32", backend="native_chunkwise")
    models = variants(random_weights(config, 0))
    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.prompt))
    greedy = {}
    for name, model in models.items():
        greedy[name] = Generator(model)(prompts, max_new_tokens=args.new_tokens).tokens
    tokens = np.concatenate([prompts, greedy["bf16"]], axis=1)
    cont = slice(args.prompt - 1, tokens.shape[1] - 1)  # the positions that predict the continuation
    reference = forward(models["bf16"], tokens)[:, cont].astype(np.float64)
    rows = []
    for name, model in models.items():
        same = np.cumprod(greedy[name] == greedy["bf16"], axis=1).sum(axis=1)
        rows.append({"variant": name, **errors(forward(model, tokens)[:, cont], reference),
                     "greedy_prefix": float(np.mean(same) / args.new_tokens)})
        print(f"random {name:20s} " + "  ".join(f"{k} {v:.3g}" for k, v in rows[-1].items() if k != "variant"),
              flush=True)
    size = dict(embedding_dim=args.dim, num_heads=args.heads, num_blocks=args.blocks, vocab=config.vocab_size,
                params=config.num_params(), batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens)
    return {"size": size, "top1_margin": margin(reference), "rows": rows}


def mqar_part(args) -> dict:
    from xlstm_jax.train.checkpoints import read_run_config
    from xlstm_jax.train.mqar import MQARConfig, mqar_batch

    if not os.path.isdir(os.path.join(args.run, "model")):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "xlstm_jax.cli", "train", "--output-dir", args.run], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"mqar: trained {args.run} in {time.perf_counter() - start:.0f} s", flush=True)
    run = read_run_config(args.run)
    task = MQARConfig(vocab_size=run["vocab_size"], seq_len=run["seq_len"], num_kv_pairs=run["num_kv_pairs"],
                      num_queries=run.get("num_queries"))
    batches = [jax.device_get(mqar_batch(jax.random.key(10**6 + i), task, 32)) for i in range(64)]
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches]) > 0
    models = variants(from_pretrained(args.run, "float32", param_dtype="float32", weight_mode="fused"))
    reference = forward(models["bf16"], inputs)[mask].astype(np.float64)
    rows = []
    for name, model in models.items():
        logits = forward(model, inputs)
        accuracy = float(np.mean(np.argmax(logits, -1)[mask] == targets[mask]))
        rows.append({"variant": name, "accuracy": accuracy, **errors(logits[mask], reference)})
        print(f"mqar {name:20s} " + "  ".join(f"{k} {v:.4g}" for k, v in rows[-1].items() if k != "variant"),
              flush=True)
    return {"run": {k: run.get(k) for k in ("embedding_dim", "num_heads", "num_blocks", "vocab_size", "seq_len",
                                            "num_kv_pairs", "steps", "seed")},
            "queries": int(mask.sum()), "top1_margin": margin(reference), "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["random", "mqar"], choices=["random", "mqar"])
    parser.add_argument("--dim", type=int, default=2048, help="embedding dim of the random model")
    parser.add_argument("--heads", type=int, default=4, help="heads (4 at dim 2048: the 7B's head dims 256 / 512)")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--run", default="/tmp/xlstm-quant-mqar", help="an `xlstm-jax train` MQAR output dir")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if "random" in args.parts:
        results["random"] = random_part(args)
    if "mqar" in args.parts:
        results["mqar"] = mqar_part(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
