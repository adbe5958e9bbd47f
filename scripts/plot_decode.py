"""Draw the decoding results of `scripts/decode_bench.py` (issue 19): the mLSTM step against its floor and target,
xLSTM-7B tokens/s at batch 1 and 16, and the time to first token per prompt length, each with issue 19's target and,
where one run measured it, the baseline of the issue (the figures it quotes, same GPU).

    python scripts/plot_decode.py docs/results/h200-2026-12-04/issue19 --out decode.png
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


def _load(folder: Path, name: str, key: str) -> list[dict]:
    path = folder / name
    return json.loads(path.read_text())[key] if path.exists() else []


def draw(folder: Path, out: Path) -> None:
    step = [r for r in _load(folder, "decode_step.json", "step") if r["states"] == "float32"]
    generate = _load(folder, "generate_fused.json", "generate")
    tokens = {r["B"]: r["tokens_per_s"] for r in generate if r["what"].startswith("generate")}
    ttft = {r["prompt"]: r["ms"] for r in generate if r["what"] == "time to first token"}
    if not (step or tokens or ttft):
        raise SystemExit(f"error: no decode_step.json or generate_fused.json in {folder}")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    ax = axes[0]
    ax.barh([r["what"] for r in step], [r["us"] for r in step], color="tab:blue")
    ax.axvline(STEP_TARGET_US, color="tab:green", ls="--", label=f"target {STEP_TARGET_US:.0f} µs")
    ax.axvline(STEP_FLOOR_US, color="gray", ls=":", label=f"floor (C read + written) {STEP_FLOOR_US:.0f} µs")
    ax.set_xlabel("µs per step (B=16, NH=8, 256/512, float32 states)")
    ax.set_title("one mLSTM step")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
    batches = sorted(tokens)
    x = range(len(batches))
    for offset, values, label, color in ((-0.2, TOKENS_BASELINE, "issue baseline", "lightgray"),
                                         (0.2, tokens, "ours", "tab:blue")):
        heights = [values.get(b, 0) / TOKENS_TARGET[b] for b in batches]
        bars = ax.bar([i + offset for i in x], heights, 0.4, label=label, color=color)
        ax.bar_label(bars, [f"{values.get(b, 0):,.0f} tok/s" for b in batches], fontsize=8)
    ax.axhline(1.0, color="tab:green", ls="--", label="target (250 and 3,500 tok/s)")
    ax.set_xticks(list(x), [f"batch {b}" for b in batches])
    ax.set_ylabel("fraction of the target")
    ax.set_ylim(0, 1.45)
    ax.set_title("xLSTM-7B generation (128-token prompt)")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[2]
    prompts = sorted(ttft)
    ax.plot(prompts, [ttft[p] for p in prompts], "o-", label="ours", color="tab:blue")
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
    parser.add_argument("folder", type=Path, help="a results folder with decode_step.json / generate_fused.json")
    parser.add_argument("--out", type=Path, default=Path("decode.png"))
    args = parser.parse_args(argv)
    draw(args.folder, args.out)


if __name__ == "__main__":
    main()
