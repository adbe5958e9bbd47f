"""The PyTorch peer of `scripts/train_throughput.py` (issue 35): the official xLSTM (`xlstm.xlstm_large.xLSTMLarge`,
pip xlstm and mlstm_kernels 2.0.6) trained on random tokens at our benchmark sizes, on the same GPU, in its own
process.

The same step as ours as far as upstream allows: float32 parameters under bf16 autocast (the mLSTM kernels in
bf16), next-token cross-entropy over all positions, global-norm clipping at 1.0 and AdamW (b1 0.9, b2 0.95,
eps 1e-8, weight decay 0.1; fused on CUDA); the embedding and the LM head are separate matrices upstream, where our
benchmark step ties them (same FLOPs, 38.6M more parameters at D 768). Timed as ours: after `--warmup` steps,
`--reps` runs of 5 steps with one synchronisation each, the median per step; peak memory from
`torch.cuda.max_memory_allocated()`. Kernels: limit-chunk (upstream's xl-chunk kernels abort under triton 3.6);
`--kernel chunkwise--native_autograd` and `--device cpu --tiny` check the script without a GPU. Needs torch; run
it in its own process (docs/benchmarks.md, Peers).

    python scripts/train_peer_torch.py --size 125m --batch 8 --json peer125.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SIZES = {  # as xlstm_jax.train.benchmark.SIZES (vocabulary 50304; 256 for tiny)
    "125m": dict(embedding_dim=768, num_heads=4, num_blocks=12),
    "1.3b": dict(embedding_dim=2048, num_heads=8, num_blocks=24),
    "tiny": dict(embedding_dim=64, num_heads=2, num_blocks=2),
}
BACK_TO_BACK = 5  # steps per timed run, as xlstm_jax.train.benchmark.BACK_TO_BACK


def build(size: str, kernel: str, device: str):
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    triton = "triton" in kernel  # the sequence and step kernels (unused in training) must exist here too
    config = xLSTMLargeConfig(**SIZES[size], vocab_size=256 if size == "tiny" else 50304, mode="train",
                              chunkwise_kernel=kernel, autocast_kernel_dtype="bfloat16", chunk_size=64,
                              sequence_kernel=f"native_sequence__{'triton' if triton else 'native'}",
                              step_kernel="triton" if triton else "native",
                              return_last_states=True)  # the layer unpacks (h, state) from its backend either way
    with torch.device(device):
        model = xLSTMLarge(config)
    decay = [p for name, p in model.named_parameters() if p.ndim == 2 and "embedding" not in name]
    rest = [p for name, p in model.named_parameters() if not (p.ndim == 2 and "embedding" not in name)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=device == "cuda")
    return model, optimizer, config


def make_step(model, optimizer, device: str):
    import torch
    import torch.nn.functional as F

    def step(tokens):
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(size: str, batch: int, seq_len: int, kernel: str, device: str, warmup: int, reps: int) -> dict:
    import torch

    torch.manual_seed(0)
    model, optimizer, config = build(size, kernel, device)
    n_params = sum(p.numel() for p in model.parameters())
    step = make_step(model, optimizer, device)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [float(step(tokens))]
    first_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        step(tokens)
    sync()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(BACK_TO_BACK):
            loss = step(tokens)
        sync()
        seconds.append((time.perf_counter() - start) / BACK_TO_BACK)
    losses.append(float(loss))
    step_s = statistics.median(seconds)
    return {"size": size, "batch": batch, "seq_len": seq_len, "kernel": kernel, "params_M": n_params / 1e6,
            "step_ms": step_s * 1e3, "tokens_per_s": batch * seq_len / step_s, "first_step_s": first_s,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            "loss_first": losses[0], "loss_last": losses[-1], "torch": torch.__version__}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="125m", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--kernel", default="chunkwise--triton_limit_chunk",
                        help="upstream's chunkwise kernel (chunkwise--native_autograd runs without a GPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="size tiny, B 2, S 64: a check of the script")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.seq_len = "tiny", 2, 64
    if min(args.batch, args.seq_len, args.reps) < 1 or args.warmup < 0:
        parser.error("batch, seq-len and reps must be >= 1 and warmup >= 0")
    row = measure(args.size, args.batch, args.seq_len, args.kernel, args.device, args.warmup, args.reps)
    peak = "" if row["peak_mb"] is None else f", peak {row['peak_mb']:,.0f} MB"
    print(f"torch xLSTMLarge {row['size']} ({row['params_M']:.1f}M params) B={row['batch']} S={row['seq_len']} "
          f"{row['kernel']}: step {row['step_ms']:.2f} ms, {row['tokens_per_s']:,.0f} tokens/s{peak}; loss "
          f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=1)
    return row


if __name__ == "__main__":
    main()
