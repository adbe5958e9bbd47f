"""The PyTorch peer of `scripts/decode_bench.py --parts generate` (issue 19): the official xLSTM-7B
(`xlstm.xlstm_large.xLSTMLarge`, pip xlstm and mlstm_kernels 2.0.6) with random bf16 weights on the same GPU.

Measured as decode_bench measures ours: per token = (time of a 2 + 128 token generation - time of a 2 token one) / 128
after a 128-token prompt, at batch 1 and 16; the time to the first token (prefill + one token, batch 1) at 128,
2,048 and 8,192 prompt tokens; medians of 3 timed calls after one warm-up. `--graphs` also times the decode step
replayed from one captured CUDA graph (upstream's state update is in place, so the graph carries it), per token.
`step_rows` times upstream's Triton step kernel alone at the step shape of decode_bench.
Upstream's kernels: limit-chunk prefill (its xl-chunk kernel aborts in LLVM under triton 3.6), Triton step.
Needs torch with CUDA; run it in its own process with its own package folder (docs/benchmarks.md, Peers).

    python scripts/decode_peer_torch.py --json peer.json [--graphs] [--weight-mode fused]
"""

from __future__ import annotations

import argparse
import json
import time


def build(weight_mode: str):
    import torch
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    config = xLSTMLargeConfig(
        embedding_dim=4096, num_heads=8, num_blocks=32, vocab_size=50304, mode="inference",
        chunkwise_kernel="chunkwise--triton_limit_chunk", sequence_kernel="native_sequence__triton",
        step_kernel="triton", return_last_states=True, autocast_kernel_dtype="bfloat16",
        inference_state_dtype="float32", weight_mode=weight_mode)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = xLSTMLarge(config)
    return model.eval()


def _median_seconds(fn, runs: int = 3) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def eager_rows(model, batches, prompt_len: int, new_tokens: int, first_token_lengths) -> list[dict]:
    import torch

    rows = []
    with torch.inference_mode():
        for B in batches:
            prompt = torch.ones((B, prompt_len), dtype=torch.long, device="cuda")
            short, long = (_median_seconds(lambda n=n: model.generate(prompt, max_length=n))
                           for n in (2, 2 + new_tokens))
            per_token = (long - short) / new_tokens
            rows.append({"B": B, "what": f"generate, {prompt_len}-token prompt", "mode": "eager",
                         "ms_per_token": 1e3 * per_token, "tokens_per_s": B / per_token})
            print(f"peer eager B={B}: {1e3 * per_token:.3f} ms/token {B / per_token:,.0f} tok/s", flush=True)
        for length in first_token_lengths:
            prompt = torch.ones((1, length), dtype=torch.long, device="cuda")
            ms = 1e3 * _median_seconds(lambda p=prompt: model.generate(p, max_length=1))
            rows.append({"B": 1, "what": "time to first token", "mode": "eager", "prompt": length, "ms": ms})
            print(f"peer eager first token, {length}-token prompt: {ms:.1f} ms", flush=True)
    return rows


def graph_rows(model, batches, prompt_len: int, new_tokens: int) -> list[dict]:
    """The decode step (one token in, greedy next token out, states updated in place) captured once as a CUDA graph
    after a prefill, then replayed new_tokens times per timed call."""
    import torch

    rows = []
    with torch.inference_mode():
        for B in batches:
            _, state = model(torch.ones((B, prompt_len), dtype=torch.long, device="cuda"))
            token = torch.ones((B, 1), dtype=torch.long, device="cuda")

            def step():
                logits, _ = model(token, state)
                token.copy_(torch.argmax(logits[:, -1:], dim=-1))

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()

            def replay():
                for _ in range(new_tokens):
                    graph.replay()

            per_token = _median_seconds(replay) / new_tokens
            rows.append({"B": B, "what": f"decode step, CUDA graph, {prompt_len}-token prompt", "mode": "cuda_graph",
                         "ms_per_token": 1e3 * per_token, "tokens_per_s": B / per_token})
            print(f"peer CUDA graph B={B}: {1e3 * per_token:.3f} ms/token {B / per_token:,.0f} tok/s", flush=True)
    return rows


def step_rows(B=16, NH=8, DHQK=256, DHHV=512, steps=16) -> list[dict]:
    """Upstream's Triton step kernel (`mlstm_kernels.torch.recurrent.triton_step`) at decode_bench's step shape, bf16
    q/k/v, float32 states written into a second buffer (no allocation): per step of a `steps`-step loop, eager and
    replayed from one CUDA graph (close to the kernel's own time)."""
    import torch
    from mlstm_kernels.torch.recurrent.triton_step import mlstm_recurrent_step__triton_fw

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen)

    q, k = randn(B, NH, DHQK, dtype=torch.bfloat16), randn(B, NH, DHQK, dtype=torch.bfloat16)
    v = randn(B, NH, DHHV, dtype=torch.bfloat16)
    i, f = randn(B, NH, 1), 3.0 + randn(B, NH, 1)
    states = [(randn(B, NH, DHQK, DHHV), randn(B, NH, DHQK), torch.zeros(B, NH, 1, device="cuda")) for _ in range(2)]

    def loop():
        for t in range(steps):
            old, new = states[t % 2], states[1 - t % 2]
            mlstm_recurrent_step__triton_fw(*old, q, k, v, i, f, *new)

    rows = [{"what": "mlstm_kernels triton step, eager loop", "us": 1e6 * _median_seconds(loop) / steps}]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop()
    rows.append({"what": "mlstm_kernels triton step, CUDA graph", "us": 1e6 * _median_seconds(graph.replay) / steps})
    for row in rows:
        print(f"peer step {row['what']}: {row['us']:.1f} us", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weight-mode", default="fused", choices=["single", "fused"])
    parser.add_argument("--graphs", action="store_true", help="also time the decode step replayed as a CUDA graph")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    import torch
    import xlstm

    if not torch.cuda.is_available():
        raise SystemExit("error: the PyTorch peer needs a CUDA GPU")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "xlstm": xlstm.__version__,
               "weight_mode": args.weight_mode}
    results["step"] = step_rows()
    model = build(args.weight_mode)
    results["generate"] = eager_rows(model, (1, 16), 128, 128, (128, 2048, 8192))
    _write(results, args.json)
    if args.graphs:
        try:
            results["graphs"] = graph_rows(model, (1, 16), 128, 128)
        except Exception as err:  # a capture the peer does not allow is a result too; the eager rows stand
            results["graphs_error"] = f"{type(err).__name__}: {err}"
            print(f"peer CUDA graph: failed: {results['graphs_error']}", flush=True)
        _write(results, args.json)


def _write(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
