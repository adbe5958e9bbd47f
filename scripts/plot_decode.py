"""Draw the decoding results of issue 19 side by side: `scripts/decode_bench.py` (ours) and
`scripts/decode_peer_torch.py` (the official PyTorch xLSTM-7B and upstream's Triton step, same GPU): the mLSTM step
against its floor and target, xLSTM-7B tokens/s at batch 1 and 16, and the time to first token per prompt length,
each with issue 19's target and the baseline the issue quotes.

    python scripts/plot_decode.py --step decode_step.json --generate generate.json first_token.json \
        --peer peer.json --out decode.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# issue 19's targets and the baselines it quotes (H200, 2026-12-03)
STEP_TARGET_US, STEP_FLOOR_US = 45.0, 31.0
TOKENS_TARGET = {1: 250.0, 16: 3500.0}
TOKENS_BASELINE = {1: 130.0, 16: 2672.0}
TTFT_TARGET_MS = {8192: 160.0}
TTFT_BASELINE_MS = {8192: 240.0}


def _load(path: Path | None, key: str) -> list[dict]:
    if path is None:
        return []
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist")
    return json.loads(path.read_text()).get(key, [])


def _step_bars(step: list[dict], peer_step: list[dict]) -> list[tuple[str, float, str]]:
    """(label, µs, color) for the float32-state step: ours per loop step and kernel alone, the peer's."""
    bars = []
    for r in step:
        if r["states"] != "float32" or r["what"].startswith("triton BV"):
            continue
        bars.append((f"{r['what']} (loop)", r["us"], "tab:blue"))
        if r.get("kernel_us") is not None:
            bars.append((f"{r['what']} (kernel)", r["kernel_us"], "tab:cyan"))
    bars += [(r["what"].replace("mlstm_kernels", "upstream"), r["us"], "tab:orange") for r in peer_step]
    return bars


def draw(step_file: Path | None, generate_files: list[Path], peer_file: Path | None, out: Path) -> None:
    step = _load(step_file, "step")
    generate = [row for path in generate_files for key in ("generate", "first_token") for row in _load(path, key)]
    peer_step, peer_eager, peer_graph = (_load(peer_file, key) for key in ("step", "generate", "graphs"))
    if not (step or generate or peer_step or peer_eager):
        raise SystemExit("error: nothing to draw: give --step, --generate or --peer with results in them")
    tokens = {r["B"]: r["tokens_per_s"] for r in generate if r["what"].startswith("generate")}
    ttft = {r["prompt"]: r["ms"] for r in generate if r["what"] == "time to first token"}
    peer_tokens = {"PyTorch xLSTMLarge, eager": {r["B"]: r["tokens_per_s"] for r in peer_eager if "prompt" not in r},
                   "PyTorch xLSTMLarge, CUDA graph": {r["B"]: r["tokens_per_s"] for r in peer_graph}}
    peer_ttft = {r["prompt"]: r["ms"] for r in peer_eager if "prompt" in r}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))

    ax = axes[0]
    bars = _step_bars(step, peer_step)
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.axvline(STEP_TARGET_US, color="tab:green", ls="--", label=f"target {STEP_TARGET_US:.0f} µs")
    ax.axvline(STEP_FLOOR_US, color="gray", ls=":", label=f"floor (C read + written) {STEP_FLOOR_US:.0f} µs")
    ax.set_xlabel("µs per step (B=16, NH=8, 256/512, float32 states)")
    ax.set_title("one mLSTM step")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
    series = [("issue baseline", TOKENS_BASELINE, "lightgray"), ("ours", tokens, "tab:blue")]
    series += [(name, values, color) for (name, values), color in zip(peer_tokens.items(), ("tab:orange", "gold"))
               if values]
    batches = sorted(TOKENS_TARGET)
    width = 0.8 / len(series)
    for n, (label, values, color) in enumerate(series):
        xs = [b + (n - (len(series) - 1) / 2) * width for b in range(len(batches))]
        heights = [values.get(b, 0) / TOKENS_TARGET[b] for b in batches]
        drawn = ax.bar(xs, heights, width, label=label, color=color)
        ax.bar_label(drawn, [f"{values.get(b, 0):,.0f}" for b in batches], fontsize=7)
    ax.axhline(1.0, color="tab:green", ls="--", label="target (250 and 3,500 tok/s)")
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("fraction of the target (labels: tok/s)")
    ax.set_ylim(0, 1.45)
    ax.set_title("xLSTM-7B generation (128-token prompt)")
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[2]
    for label, values, style in (("ours", ttft, "o-"), ("PyTorch xLSTMLarge, eager", peer_ttft, "s--")):
        prompts = sorted(values)
        if prompts:
            ax.plot(prompts, [values[p] for p in prompts], style, label=label)
    for p, t in TTFT_TARGET_MS.items():
        ax.plot([p], [t], "v", color="tab:green", ms=9, label=f"target at {p}")
    for p, t in TTFT_BASELINE_MS.items():
        ax.plot([p], [t], "s", color="gray", label=f"issue baseline at {p}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens (batch 1)")
    ax.set_ylabel("ms to the first token")
    ax.set_title("time to first token")
    ax.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=Path, help="decode_bench.py --parts step JSON")
    parser.add_argument("--generate", type=Path, nargs="+", default=[],
                        help="decode_bench.py JSON files with the generate and first_token parts (later files win)")
    parser.add_argument("--peer", type=Path, help="decode_peer_torch.py JSON")
    parser.add_argument("--out", type=Path, default=Path("decode.png"))
    args = parser.parse_args(argv)
    draw(args.step, args.generate, args.peer, args.out)


if __name__ == "__main__":
    main()
