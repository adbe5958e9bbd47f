"""What a training checkpoint costs, with its checksums: the 1.3B (or 125M) xLSTM's parameters and AdamW state
saved by `xlstm_jax.train.checkpoints.RunCheckpointer` as the training job saves them.

Per save: the time `save` blocks the training loop (arrays copied off the device), the time until orbax has
committed the step, the time the background thread spends on the checksums (xxh3-128 of every file), and, on
resume, the time to verify them and to restore. Medians of `--saves` saves; the JSON goes to `--out`.

    python scripts/checkpoint_cost.py --size 1.3b --saves 3 --dir /tmp/ckpt --out checkpoint_cost.json

`--size tiny` runs in seconds (a check that the script works, e.g. on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import jax

from xlstm_jax.train.checkpoints import RunCheckpointer, verify_checksums
from xlstm_jax.train.config import TrainConfig
from xlstm_jax.train.steps import init_params, make_optimizer

SIZES = {
    "1.3b": dict(embedding_dim=2048, num_heads=8, num_blocks=24, vocab_size=50304),
    "125m": dict(embedding_dim=768, num_heads=4, num_blocks=12, vocab_size=50304),
    "tiny": dict(embedding_dim=64, num_heads=2, num_blocks=2, vocab_size=256),
}


def _tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def measure(size: str, saves: int, directory: str) -> dict:
    config = TrainConfig(**SIZES[size], steps=100, progress=False)
    tx = make_optimizer(config)
    _, params, opt_state, _ = init_params(config.model_config(), 0, tx)
    shutil.rmtree(directory, ignore_errors=True)
    checkpointer = RunCheckpointer(directory, max_to_keep=2)
    rows = []
    for step in range(1, saves + 1):
        start = time.perf_counter()
        checkpointer.save(step, params, opt_state)
        blocking = time.perf_counter() - start
        checkpointer.manager.wait_until_finished()
        committed = time.perf_counter() - start
        before = checkpointer.checksum_seconds
        checkpointer.finish_checksums()
        step_dir = os.path.join(checkpointer.directory, str(step))
        files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names]
        start = time.perf_counter()
        assert verify_checksums(step_dir)
        verify = time.perf_counter() - start
        start = time.perf_counter()
        checkpointer.restore(step, params, opt_state)
        restore = time.perf_counter() - start
        rows.append({"step": step, "save_blocking_s": blocking, "commit_s": committed,
                     "checksum_s": checkpointer.checksum_seconds - before, "verify_s": verify, "restore_s": restore,
                     "files": len(files), "bytes": sum(os.path.getsize(f) for f in files)})
    checkpointer.close()
    shutil.rmtree(directory, ignore_errors=True)
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0] if key.endswith("_s")}
    return {"size": size, "state_bytes": _tree_bytes((params, opt_state)), "saves": rows, "median": median,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/xlstm_jax_checkpoint_cost", help="scratch directory (removed)")
    parser.add_argument("--out", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)
    result = measure(args.size, args.saves, args.dir)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
