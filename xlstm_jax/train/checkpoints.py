"""Orbax checkpoints of a training run: parameters, optimizer state and step, plus the run's configs as JSON.

Directory layout under `output_dir`: `train_config.json`, `checkpoints/<step>/…` (orbax CheckpointManager) and,
after a finished run, `model/` (an HF-layout safetensors export that `xlstm_jax.from_pretrained` loads).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "train_config.json"


class RunCheckpointer:
    """Save and restore {params, opt_state, step} of a run with an orbax CheckpointManager."""

    def __init__(self, output_dir: str, *, max_to_keep: int = 2):
        self.directory = os.path.join(os.path.abspath(output_dir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any) -> None:
        """Write a checkpoint for `step` (blocks until it is on disk)."""
        state = {"params": params, "opt_state": opt_state, "step": step}
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, params: Any, opt_state: Any) -> tuple[Any, Any, int]:
        """Restore (params, opt_state, step) into the structure of the given templates."""
        target = {"params": params, "opt_state": opt_state, "step": 0}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return restored["params"], restored["opt_state"], int(restored["step"])

    def close(self) -> None:
        self.manager.close()


def write_run_config(output_dir: str, data: dict[str, Any]) -> None:
    """Store the run's configuration next to its checkpoints."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, CONFIG_FILE), "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)


def read_run_config(output_dir: str) -> dict[str, Any] | None:
    """The stored run configuration, or None when the directory has none."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)
