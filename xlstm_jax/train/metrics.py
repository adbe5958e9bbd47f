"""What a run reports: `metrics.jsonl` (and TensorBoard events when tensorboardX is installed) in the output
directory, and the model FLOPs behind tokens/s and MFU.

`metrics.jsonl` holds one JSON object per line: a logged training step (`step`, `loss`, `accuracy`,
`learning_rate`, `tokens_per_s`, `tokens_per_s_per_device`, and `mfu` where the device's peak is known) or an
evaluation (`step`, `eval_loss`, `eval_perplexity`, `eval_accuracy`). A resumed run appends to it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16/fp16 peak FLOP/s of one device (vendor data sheets, SXM parts), matched against jax's device_kind.
PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12}


def model_flops_per_token(model_config: Any, chunk_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of an `xLSTMLargeConfig` model.

    Forward: 2 FLOPs per weight of every matrix a token passes (q, k, v, gates, output gate and projection, the
    FFN, the LM head), plus per head the mLSTM cell in chunkwise form with chunk L: the causal half of the chunk's
    q·k and h·v products, L·(DHQK + DHHV), and the state's update and read-out, 4·DHQK·DHHV.
    """
    c = model_config
    D, NH, F = c.embedding_dim, c.num_heads, c.ffn_dim
    per_block = D * (2 * c.qk_dim + 2 * c.v_dim + 2 * NH) + c.v_dim * D + 3 * D * F
    matmul = c.num_blocks * per_block + D * c.vocab_size
    cell = c.num_blocks * NH * (chunk_size * (c.qk_head_dim + c.v_head_dim) + 4 * c.qk_head_dim * c.v_head_dim)
    return 3.0 * (2.0 * matmul + cell)


def peak_flops(device: Any, compute_dtype: str) -> float | None:
    """The device's dense peak for bf16/fp16 matmuls, or None (unknown device, or float32 compute)."""
    if compute_dtype not in ("bfloat16", "float16") or getattr(device, "platform", "") != "gpu":
        return None
    kind = str(getattr(device, "device_kind", ""))
    return next((peak for name, peak in PEAK_FLOPS.items() if name in kind), None)


class MetricsLog:
    """Appends records to `output_dir/metrics.jsonl` and, with tensorboardX, to TensorBoard events. `enabled`
    False (no output directory, or not process 0) makes every call a no-op."""

    def __init__(self, output_dir: str | None, *, enabled: bool = True):
        self.path = None if output_dir is None or not enabled else os.path.join(output_dir, METRICS_FILE)
        self.writer = None
        if self.path is None:
            return
        os.makedirs(output_dir, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return
        self.writer = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR))

    def has_eval(self, step: int) -> bool:
        """Whether the file already holds an evaluation record of `step`."""
        if self.path is None or not os.path.exists(self.path):
            return False
        with open(self.path) as fh:
            return any("eval_loss" in record and record["step"] == step
                       for record in map(json.loads, filter(str.strip, fh)))

    def truncate_after(self, step: int) -> None:
        """Drop the records after `step` (a resumed run repeats those steps); the file as it was is kept next to it
        as `metrics-<time>.jsonl` when anything is dropped."""
        if self.path is None or not os.path.exists(self.path):
            return
        with open(self.path) as fh:
            lines = [line for line in fh if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) == len(lines):
            return
        shutil.copy2(self.path, self.path.replace(".jsonl", time.strftime("-%Y%m%d-%H%M%S.jsonl")))
        with open(self.path, "w") as fh:
            fh.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        """One record (`step` plus float metrics); non-finite floats are written as null."""
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            for name, value in clean.items():
                if name != "step" and value is not None:
                    self.writer.add_scalar(name if name.startswith("eval_") else f"train/{name}", value,
                                           record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    """The records of `output_dir/metrics.jsonl`, in order."""
    with open(os.path.join(output_dir, METRICS_FILE)) as fh:
        return [json.loads(line) for line in fh if line.strip()]
