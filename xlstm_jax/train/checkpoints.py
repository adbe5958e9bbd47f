"""Orbax checkpoints of a training run: parameters, optimizer state and step, plus the run's configs as JSON.

Directory layout under `output_dir`: `train_config.json`, `checkpoints/<step>/…` (orbax CheckpointManager),
`damaged-checkpoints/<step>-<time>/` (checkpoints that did not read back on resume, kept aside) and, after a
finished run, `model/` (an HF-layout safetensors export that `xlstm_jax.from_pretrained` loads).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "train_config.json"
RUN_ENTRIES = (CONFIG_FILE, "checkpoints", "model")  # any of these marks a directory that holds a run
DAMAGED_DIR = "damaged-checkpoints"


class RunCheckpointer:
    """Save and restore {params, opt_state, step} of a run with an orbax CheckpointManager: sharded arrays are
    written by the processes that hold them, asynchronously (training goes on while a checkpoint is written; the
    next save, a restore and `close` wait for it)."""

    def __init__(self, output_dir: str, *, max_to_keep: int = 2):
        self.output_dir = os.path.abspath(output_dir)
        self.directory = os.path.join(self.output_dir, "checkpoints")
        self.options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                    enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any) -> None:
        """Start writing a checkpoint for `step` (returns once the arrays are copied off the devices)."""
        state = {"params": params, "opt_state": opt_state, "step": step}
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, step: int, params: Any, opt_state: Any) -> tuple[Any, Any, int]:
        """Restore (params, opt_state, step) into the structure of the given templates."""
        self.manager.wait_until_finished()
        target = {"params": params, "opt_state": opt_state, "step": 0}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return restored["params"], restored["opt_state"], int(restored["step"])

    def restore_newest_intact(self, params: Any, opt_state: Any,
                              report: Callable[[str], None]) -> tuple[Any, Any, int] | None:
        """Restore the newest checkpoint that reads back; None when none does.

        Each newer one that does not (truncated files, a missing item folder, …) is reported and moved to
        `output_dir/damaged-checkpoints/<step>-<time>`: kept for inspection, never deleted.
        """
        for step in reversed(self.steps()):
            try:
                return self.restore(step, params, opt_state)
            except Exception as err:  # orbax and TensorStore raise plain Exception for unreadable data
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                report(f"checkpoint {step} is damaged ({reason}); moved it to {self._put_aside(step)}")
        return None

    def _put_aside(self, step: int) -> str:
        aside = os.path.join(self.output_dir, DAMAGED_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), aside)
        # A fresh manager: a failed restore can leave the old one with a wrong idea of the checkpoints' items.
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self.options)
        return aside

    def close(self) -> None:
        """Wait for the last checkpoint, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def holds_run(output_dir: str) -> bool:
    """Whether `output_dir` already holds a run (its config, checkpoints or exported model)."""
    return any(os.path.exists(os.path.join(output_dir, name)) for name in RUN_ENTRIES)


def write_run_config(output_dir: str, data: dict[str, Any]) -> None:
    """Store the run's configuration next to its checkpoints."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, CONFIG_FILE), "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)


def read_run_config(output_dir: str) -> dict[str, Any] | None:
    """The stored run configuration, or None when the directory has none; ValueError when it is not JSON."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is damaged: {err}") from None
