"""The error that bfloat16 decode states add (`Generator(...)(..., state_dtype="bfloat16")`, `xlstm-jax serve
--state-dtype bfloat16`: C and n rounded to bfloat16 after every step, m float32), against float32 states, over
long decodes (docs/precision.md, "Decode states in bfloat16"). Three parts:

1. cell: the mLSTM cell alone at the xLSTM-7B's head shape (8 heads, DHQK 256, DHHV 512), bf16 q, k, v drawn
   N(0, 1), input gates N(0, 1), forget-gate pre-activations spread over the heads in three ranges (3..6: the
   initialisation, memories of 20 to 400 steps; 8..12; 15: the gate soft cap, no decay over the run), plus
   N(0, 0.5) per step. `mlstm_step` steps with float32 and with bfloat16 states against the float64 recurrence
   (`xlstm_jax.mlstm.reference`) of the same inputs: h per step and C, n at the checkpoint steps.
2. random: a model with the xLSTM-7B's mLSTM layers (D 4096, 8 heads of 256 / 512; the FFN narrowed to
   --ffn-factor, --blocks blocks, vocabulary --vocab to fit a CPU), bf16 parameters and compute, random weights
   (the initialisation, its all-zero columns drawn N(0, 2 / 5D) so that gates and output gate vary with the input;
   as scripts/measure_quantization.py). Teacher forcing: a fixed random token sequence fed one token per step
   through the decode step (`mlstm_step`), with float32 and with bfloat16 states, and float32 compute with
   float32 states as a yardstick (the error bf16 compute already has); logits and states compared per step.
3. text: the README's "A language model on real text" (the Python standard library's source, 1.5M parameters,
   trained here when --run holds no run, about 2.5 minutes), bf16 compute: the held-out modules fed token by
   token (loss and perplexity per position window, float32 against bfloat16 states, the chunkwise full pass and
   float32 compute as yardsticks), and greedy generations with both state dtypes (how long they agree).

    python scripts/measure_state_dtype.py --json state_dtype.json   # all parts, about 8 minutes on 2 CPU cores
    python scripts/measure_state_dtype.py --quick --parts cell      # tiny shapes: seconds (the test runs it)

--quick shrinks every part (the text part then trains a tiny model, about 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlstm_jax import mlstm_step
from xlstm_jax.bench.models import random_weights
from xlstm_jax.mlstm.reference import mlstm_recurrent_reference
from xlstm_jax.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig
from xlstm_jax.models.xlstm_large.generation import Generator, _carried
from xlstm_jax.models.xlstm_large.model import zero_states

F32, BF16 = jnp.float32, jnp.bfloat16
REGIMES = {"f 3..6": (3.0, 6.0), "f 8..12": (8.0, 12.0), "f 15": (15.0, 15.0)}


def rel(x, ref) -> float:
    """||x - ref|| / ||ref|| (Frobenius, float64)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def checkpoints(steps: int) -> list[int]:
    """The steps reported: 1, 64, 256, 1024, 2048, ... up to `steps` (and `steps` itself)."""
    out = [1] + [s for s in (64, 256, 1024, 2048, 4096, 8192) if s < steps]
    return out + [steps] if steps > 1 else out


# --- 1. the cell alone ---------------------------------------------------------------------------------------


@jax.jit
def _steps(q, k, v, i, f, c, n, m):
    """`mlstm_step` over the S axis of q (B, NH, S, DHQK) etc. from (c, n, m), the states carried in c's dtype
    (the decode loop's rule); returns h (B, NH, S, DHHV) in q's dtype and the last states."""
    def body(carry, xs):
        h, (c_new, n_new, m_new) = mlstm_step(*xs, *carry, backend="native")
        return (c_new.astype(c.dtype), n_new.astype(n.dtype), m_new), h

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, i, f))
    states, h = jax.lax.scan(body, (c, n, m), xs)
    return jnp.moveaxis(h, 0, 2), states


def cell_inputs(seed: int, B: int, NH: int, DHQK: int, DHHV: int, S: int, f_range: tuple[float, float]):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((B, NH, S, DHQK)), BF16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, NH, S, DHHV)), BF16)
    i = jnp.asarray(rng.standard_normal((B, NH, S)), F32)
    f = jnp.asarray(np.linspace(*f_range, NH)[None, :, None] + 0.5 * rng.standard_normal((B, NH, S)), F32)
    return q, k, v, i, f


def cell_regime(seed: int, B: int, NH: int, DHQK: int, DHHV: int, S: int, f_range) -> list[dict]:
    """Rows per checkpoint step t: h at step t and over the window (previous checkpoint, t] (relative Frobenius
    error against float64, and the median over rows, heads and steps of each h vector's relative error), C and n
    after step t, for float32 and bfloat16 states."""
    q, k, v, i, f = cell_inputs(seed, B, NH, DHQK, DHHV, S, f_range)
    marks = checkpoints(S)
    with jax.enable_x64(True):
        reference = jax.jit(mlstm_recurrent_reference)
        c64 = jnp.zeros((B, NH, DHQK, DHHV), jnp.float64)
        n64, m64 = jnp.zeros((B, NH, DHQK), jnp.float64), jnp.zeros((B, NH), jnp.float64)
        ref_h, ref_states, start = [], [], 0
        for t in marks:
            part = tuple(x[:, :, start:t].astype(jnp.float64) for x in (q, k, v, i, f))
            h64, (c64, n64, m64) = reference(*part, c64, n64, m64)
            ref_h.append(np.asarray(h64))
            ref_states.append((np.asarray(c64), np.asarray(n64)))
            start = t
    rows = []
    for name, dtype in (("float32", F32), ("bfloat16", BF16)):
        c, n, m = jnp.zeros((B, NH, DHQK, DHHV), dtype), jnp.zeros((B, NH, DHQK), dtype), jnp.zeros((B, NH), F32)
        start = 0
        for t, h64, (cr, nr) in zip(marks, ref_h, ref_states):
            h, (c, n, m) = _steps(*(x[:, :, start:t] for x in (q, k, v, i, f)), c, n, m)
            h = np.asarray(h.astype(F32), np.float64)
            per_vector = np.linalg.norm(h - h64, axis=-1) / np.linalg.norm(h64, axis=-1)
            rows.append({"states": name, "step": t, "h_step": rel(h[:, :, -1], h64[:, :, -1]),
                         "h_window": rel(h, h64), "h_median": float(np.median(per_vector)),
                         "C": rel(c.astype(F32), cr), "n": rel(n.astype(F32), nr)})
            start = t
    return rows


def cell_part(args) -> dict:
    NH, DHQK, DHHV = (2, 32, 64) if args.quick else (8, 256, 512)
    out = {"shape": {"B": args.cell_batch, "NH": NH, "DHQK": DHQK, "DHHV": DHHV, "steps": args.cell_steps},
           "regimes": {}}
    for seed, (regime, f_range) in enumerate(REGIMES.items()):
        start = time.perf_counter()
        rows = cell_regime(seed, args.cell_batch, NH, DHQK, DHHV, args.cell_steps, f_range)
        out["regimes"][regime] = rows
        for row in rows:
            print(f"cell {regime:8s} {row['states']:8s} step {row['step']:5d}  " +
                  "  ".join(f"{key} {row[key]:.2e}" for key in ("h_step", "h_window", "h_median", "C", "n")),
                  flush=True)
        print(f"cell {regime}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


# --- 2. the 7B's mLSTM layers with random weights -------------------------------------------------------------


def with_dtypes(model: xLSTMLarge, compute_dtype: str, param_dtype: str) -> xLSTMLarge:
    """The same weights (rounded to `param_dtype`) in a model computing in `compute_dtype`."""
    config = model.config.replace(compute_dtype=compute_dtype, param_dtype=param_dtype)
    out = nnx.eval_shape(lambda: xLSTMLarge(config, rngs=nnx.Rngs(0)))
    nnx.update(out, jax.tree.map(lambda x: x.astype(param_dtype), nnx.state(model)))
    return out


def teacher_forced(model: xLSTMLarge, tokens: np.ndarray, state_dtype: str, segment: int, marks: list[int]):
    """Feed tokens (B, S) one per decode step (`mlstm_step`, states carried in `state_dtype` as the decode loop
    carries them). Returns logits (B, S, V) float32 and {step: states as float32 numpy} at the marks that end a
    segment of `segment` steps."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, states, tokens):
        model = nnx.merge(graphdef, params)

        def body(states, token):
            logits, states = model(token[:, None], states=states, return_states=True, backend="mlstm_step")
            return _carried(states, state_dtype), logits[:, 0]

        states, logits = jax.lax.scan(body, states, tokens.T)
        return states, jnp.moveaxis(logits, 0, 1)

    B, S = tokens.shape
    states = _carried(zero_states(model.config, B), state_dtype)
    logits, kept = [], {}
    for start in range(0, S, segment):
        states, part = run(params, states, jnp.asarray(tokens[:, start:start + segment]))
        logits.append(np.asarray(part))
        if start + segment in marks:
            kept[start + segment] = [tuple(np.asarray(x.astype(F32)) for x in block[:2]) for block in states]
    return np.concatenate(logits, axis=1), kept


def logit_rows(logits, reference, marks, tag: str) -> list[dict]:
    """Per checkpoint step: the relative logits error at that step, over the window (previous mark, step], and
    the window's top-1 agreement."""
    rows, start = [], 0
    for t in marks:
        window = slice(start, t)
        rows.append({"compare": tag, "step": t, "logits_step": rel(logits[:, t - 1], reference[:, t - 1]),
                     "logits_window": rel(logits[:, window], reference[:, window]),
                     "top1_window": float(np.mean(np.argmax(logits[:, window], -1)
                                                  == np.argmax(reference[:, window], -1)))})
        start = t
    return rows


def random_part(args) -> dict:
    config = xLSTMLargeConfig(embedding_dim=args.dim, num_heads=args.heads, num_blocks=args.blocks,
                              vocab_size=args.vocab, ffn_proj_factor=args.ffn_factor, weight_mode="fused",
                              compute_dtype="float32", backend="native_chunkwise")
    float32_model = random_weights(config, 0)
    bf16 = with_dtypes(float32_model, "bfloat16", "bfloat16")
    yardstick = with_dtypes(float32_model, "float32", "bfloat16")  # the same bf16 weights, float32 compute
    del float32_model
    tokens = np.random.default_rng(1).integers(3, config.vocab_size, (args.batch, args.steps)).astype(np.int32)
    marks = checkpoints(args.steps)
    start = time.perf_counter()
    exact, exact_states = teacher_forced(bf16, tokens, "float32", args.segment, marks)
    half, half_states = teacher_forced(bf16, tokens, "bfloat16", args.segment, marks)
    wide, _ = teacher_forced(yardstick, tokens, "float32", args.segment, marks)
    seconds = time.perf_counter() - start
    rows = logit_rows(half, exact, marks, "bf16 states vs float32 states")
    for row in rows:
        if row["step"] in exact_states:
            pairs = list(zip(half_states[row["step"]], exact_states[row["step"]]))
            row["C"] = rel(np.concatenate([h[0].ravel() for h, _ in pairs]),
                           np.concatenate([e[0].ravel() for _, e in pairs]))
            row["n"] = rel(np.concatenate([h[1].ravel() for h, _ in pairs]),
                           np.concatenate([e[1].ravel() for _, e in pairs]))
            row["C_worst_block"] = max(rel(h[0], e[0]) for h, e in pairs)
    rows += logit_rows(exact, wide, marks, "bf16 compute vs float32 compute (float32 states)")
    for row in rows:
        print(f"random {row['compare']:50s} step {row['step']:5d}  " +
              "  ".join(f"{key} {value:.3g}" for key, value in row.items() if key not in ("compare", "step")),
              flush=True)
    top = np.sort(exact, axis=-1)[..., -2:]
    size = {"embedding_dim": config.embedding_dim, "num_heads": config.num_heads, "DHQK": config.qk_head_dim,
            "DHHV": config.v_head_dim, "num_blocks": config.num_blocks, "ffn_dim": config.ffn_dim,
            "vocab": config.vocab_size, "params": config.num_params(), "batch": args.batch, "steps": args.steps}
    print(f"random: {seconds:.0f} s for three teacher-forced decodes", flush=True)
    return {"size": size, "seconds": seconds, "logits_std": float(np.std(exact)),
            "top1_margin": float(np.median(top[..., 1] - top[..., 0])), "rows": rows}


# --- 3. a language model trained on the standard library's source ----------------------------------------------


def stdlib_corpus(folder: pathlib.Path) -> tuple[list[str], list[str]]:
    """The README recipe's files: the first 60 standard-library modules to train on, the next 10 held out, each a
    .txt file; returns (train paths, held-out paths)."""
    modules = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    paths = {}
    for part, files in (("train", modules[:60]), ("heldout", modules[60:70])):
        (folder / part).mkdir(parents=True, exist_ok=True)
        paths[part] = []
        for source in files:
            target = folder / part / (source.stem + ".txt")
            target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
            paths[part].append(str(target))
    return paths["train"], paths["heldout"]


def train_text_model(run: str, quick: bool) -> None:
    """The README recipe: a byte-level BPE tokenizer (4096) and `xlstm-jax train` (400 steps; --quick: 20 steps
    of a smaller model) into `run`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = pathlib.Path(run + "-data")
    train, _ = stdlib_corpus(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512 if quick else 4096, special_tokens=["<|endoftext|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train(sorted(train), trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    size = ["--embedding-dim", "32", "--num-heads", "2", "--steps", "20", "--batch-size", "4"] if quick else \
        ["--embedding-dim", "128", "--num-heads", "4", "--steps", "400", "--batch-size", "16"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xlstm_jax.cli", "train", "--data", *sorted(train), "--tokenizer",
                    str(folder / "tokenizer.json"), "--eos-id", "0", "--seq-len", "128", *size, "--lr", "3e-3",
                    "--output-dir", run], check=True, stdout=subprocess.DEVNULL)
    print(f"text: trained {run} in {time.perf_counter() - start:.0f} s", flush=True)


def token_losses(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-token negative log-likelihood (B, S) float64."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def text_part(args) -> dict:
    from xlstm_jax.models.xlstm_large import from_pretrained
    from xlstm_jax.models.xlstm_large.checkpoint import training_export
    from xlstm_jax.models.xlstm_large.tokenizer import load_tokenizer

    if not os.path.isdir(os.path.join(args.run, "model")):
        train_text_model(args.run, args.quick)
    export = training_export(args.run)
    tokenizer = load_tokenizer(export)
    model = from_pretrained(export, "bfloat16", param_dtype="float32", backend="native_chunkwise")
    wide = from_pretrained(export, "float32", param_dtype="float32", backend="native_chunkwise")
    _, heldout = stdlib_corpus(pathlib.Path(args.run + "-data"))
    stream = []
    for path in sorted(heldout):  # each module one document, <|endoftext|> (id 0) after it, as training appends
        stream += tokenizer.encode(pathlib.Path(path).read_text(encoding="utf-8"), add_special_tokens=False).ids + [0]
    B, S = args.text_batch, args.text_steps
    if len(stream) < B * (S + 1):
        raise SystemExit(f"the held-out modules hold {len(stream)} tokens, fewer than {B} x {S + 1}")
    rows = np.asarray(stream[:B * (S + 1)], np.int32).reshape(B, S + 1)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    marks = checkpoints(S)
    start = time.perf_counter()
    exact, exact_states = teacher_forced(model, inputs, "float32", args.segment, marks)
    half, half_states = teacher_forced(model, inputs, "bfloat16", args.segment, marks)
    float32_compute, _ = teacher_forced(wide, inputs, "float32", args.segment, marks)
    graphdef, params = nnx.split(model)
    full = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, backend="native_chunkwise"))(params, inputs))
    losses = {name: token_losses(x, targets) for name, x in
              (("float32 states", exact), ("bfloat16 states", half), ("chunkwise pass", full),
               ("float32 compute", float32_compute))}
    windows, lo = [], 0
    for t in marks:
        row = {"steps": f"{lo + 1}-{t}"}
        for name, loss in losses.items():
            row[name] = float(loss[:, lo:t].mean())
        row["perplexity change"] = float(np.exp(row["bfloat16 states"] - row["float32 states"]) - 1.0)
        row["logits relative"] = rel(half[:, lo:t], exact[:, lo:t])
        row["top1 agreement"] = float(np.mean(np.argmax(half[:, lo:t], -1) == np.argmax(exact[:, lo:t], -1)))
        row["bf16 compute: logits relative"] = rel(exact[:, lo:t], float32_compute[:, lo:t])
        row["bf16 compute: top1 agreement"] = float(np.mean(np.argmax(exact[:, lo:t], -1)
                                                            == np.argmax(float32_compute[:, lo:t], -1)))
        if t in exact_states:
            row["C"] = rel(np.concatenate([h[0].ravel() for h in half_states[t]]),
                           np.concatenate([e[0].ravel() for e in exact_states[t]]))
            row["n"] = rel(np.concatenate([h[1].ravel() for h in half_states[t]]),
                           np.concatenate([e[1].ravel() for e in exact_states[t]]))
        windows.append(row)
        lo = t
    whole = {name: float(loss.mean()) for name, loss in losses.items()}
    teacher_seconds = time.perf_counter() - start
    for row in windows:
        print("text " + "  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    print("text whole: " + "  ".join(f"{k} {v:.5f} (ppl {np.exp(v):.3f})" for k, v in whole.items()), flush=True)
    start = time.perf_counter()
    serve = Generator(model)
    prompts = rows[:, :args.prompt]
    greedy = {dtype: serve(prompts, max_new_tokens=args.new_tokens, state_dtype=dtype).tokens
              for dtype in ("float32", "bfloat16")}
    same = greedy["float32"] == greedy["bfloat16"]
    prefix = np.cumprod(same, axis=1).sum(axis=1)
    generation = {"rows": B, "prompt": args.prompt, "new_tokens": args.new_tokens,
                  "agreement": float(same.mean()), "prefix_share": float(prefix.mean() / args.new_tokens),
                  "first_difference": [int(p) if p < args.new_tokens else None for p in prefix],
                  "seconds": time.perf_counter() - start}
    print(f"text greedy: {generation}", flush=True)
    return {"run": args.run, "tokens": len(stream), "batch": B, "steps": S, "teacher_forced_seconds": teacher_seconds,
            "whole": whole, "windows": windows, "greedy": generation}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["cell", "random", "text"], choices=["cell", "random", "text"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps (seconds; for the tests)")
    parser.add_argument("--cell-batch", type=int, default=2)
    parser.add_argument("--cell-steps", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=4096, help="random model: embedding dim (4096: the 7B's)")
    parser.add_argument("--heads", type=int, default=8, help="random model: heads (8 at 4096: DHQK 256, DHHV 512)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--ffn-factor", type=float, default=0.25, help="random model: FFN width / D (7B: 2.667)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="random model: rows")
    parser.add_argument("--steps", type=int, default=2048, help="random model: teacher-forced decode steps")
    parser.add_argument("--segment", type=int, default=64, help="decode steps per compiled scan")
    parser.add_argument("--run", default="/tmp/xlstm-state-dtype-text", help="text model (`xlstm-jax train` dir)")
    parser.add_argument("--text-batch", type=int, default=8)
    parser.add_argument("--text-steps", type=int, default=2048)
    parser.add_argument("--prompt", type=int, default=16, help="text: greedy generation prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=1024, help="text: greedy tokens generated per row")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.cell_steps, args.cell_batch = min(args.cell_steps, 64), min(args.cell_batch, 2)
        args.dim, args.heads, args.blocks, args.ffn_factor, args.vocab = 64, 2, 1, 1.0, 64
        args.batch, args.steps, args.segment = 2, 64, 16
        args.text_batch, args.text_steps, args.new_tokens = 2, 64, 16
        if args.run == parser.get_default("run"):
            args.run += "-quick"
    for name in ("steps", "text_steps"):
        if getattr(args, name) % args.segment:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of --segment ({args.segment})")
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "quick": args.quick}
    start = time.perf_counter()
    for part, run in (("cell", cell_part), ("random", random_part), ("text", text_part)):
        if part in args.parts:
            results[part] = run(args)
    results["seconds"] = time.perf_counter() - start
    print(f"total {results['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
