"""Orbax checkpoints of a training run: parameters, optimizer state and step, plus the run's configs as JSON.

Directory layout under `output_dir`: `train_config.json`, `checkpoints/<step>/…` (orbax CheckpointManager) with
`checkpoints/<step>/checksums.json` (an xxh3-128 digest and the size of every file of the step, written once orbax
has committed it), `damaged-checkpoints/<step>-<time>/` (checkpoints that did not read back or whose files no longer
match their checksums on resume, kept aside) and, after a finished run, `model/` (an HF-layout safetensors export
that `xlstm_jax.from_pretrained` loads).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
import xxhash

CONFIG_FILE = "train_config.json"
RUN_ENTRIES = (CONFIG_FILE, "checkpoints", "model")  # any of these marks a directory that holds a run
DAMAGED_DIR = "damaged-checkpoints"
CHECKSUMS_FILE = "checksums.json"
_BLOCK = 1 << 24  # bytes read per hash update


class IntegrityError(Exception):
    """A checkpoint's files differ from the checksums written when it was saved."""


class ShapeMismatch(ValueError):
    """A readable checkpoint whose arrays have other shapes (or names) than the run's model and optimizer: the
    settings differ from the run's, the checkpoint is not damaged."""


def _path_name(path: tuple) -> str:
    parts = []
    for key in path:
        part = next((v for v in (getattr(key, "key", None), getattr(key, "idx", None), getattr(key, "name", None))
                     if v is not None), key)
        parts.append(str(part))
    return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of the params and opt_state leaves of a checkpoint tree (arrays or array metadata)."""
    return {name: tuple(getattr(leaf, "shape", ())) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if (name := _path_name(path)).startswith(("params/", "opt_state/"))}


def _digest(path: str) -> str:
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def _files(step_dir: str) -> list[str]:
    """The files of a step directory (relative paths, sorted), without the checksum file."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != CHECKSUMS_FILE:
                found.append(rel)
    return sorted(found)


def write_checksums(step_dir: str) -> None:
    """Digest and size of every file of a committed step directory, into `step_dir/checksums.json` (written
    under a temporary name and renamed)."""
    entries = {rel: {"xxh3_128": _digest(os.path.join(step_dir, rel)),
                     "bytes": os.path.getsize(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
    tmp = os.path.join(step_dir, CHECKSUMS_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"algorithm": "xxh3_128", "files": entries}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(step_dir, CHECKSUMS_FILE))


def verify_checksums(step_dir: str) -> bool:
    """True when every file matches `checksums.json`; False when the step has no checksum file (saved by an older
    version, or the run stopped between the commit and the checksums). Raises IntegrityError naming the first
    file that is missing, added, of another size or of another digest, or a damaged checksum file."""
    path = os.path.join(step_dir, CHECKSUMS_FILE)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as fh:
            entries = json.load(fh)["files"]
        expected = {rel: (int(e["bytes"]), str(e["xxh3_128"])) for rel, e in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise IntegrityError(f"{CHECKSUMS_FILE} is damaged ({type(err).__name__})") from None
    present = _files(step_dir)
    for rel in sorted(set(expected) | set(present)):
        full = os.path.join(step_dir, rel)
        if rel not in expected:
            raise IntegrityError(f"{rel} was not there when the checkpoint was saved")
        if rel not in present:
            raise IntegrityError(f"{rel} is missing")
        size, digest = expected[rel]
        if os.path.getsize(full) != size:
            raise IntegrityError(f"{rel} has {os.path.getsize(full)} bytes, {size} when saved")
        if _digest(full) != digest:
            raise IntegrityError(f"{rel} does not match its checksum (its bytes changed since the save)")
    return True


class RunCheckpointer:
    """Save and restore {params, opt_state, step} of a run with an orbax CheckpointManager: sharded arrays are
    written by the processes that hold them, asynchronously (training goes on while a checkpoint is written; the
    next save, a restore and `close` wait for it)."""

    def __init__(self, output_dir: str, *, max_to_keep: int = 2):
        self.output_dir = os.path.abspath(output_dir)
        self.directory = os.path.join(self.output_dir, "checkpoints")
        self.options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                    enable_async_checkpointing=True)
        self.manager = self._manager()
        self._pending: int | None = None  # a step saved asynchronously whose checksums are not written yet
        self._hashing: threading.Thread | None = None
        self._hash_error: BaseException | None = None
        self.checksum_seconds = 0.0  # time spent writing checksums (in the background thread), for reports

    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, item_handlers=ocp.StandardCheckpointHandler(),
                                     options=self.options)

    def check_shapes(self, step: int, params: Any, opt_state: Any) -> None:
        """ShapeMismatch when checkpoint `step`'s array metadata is readable and names other arrays or shapes
        than the templates (unreadable metadata is left to the restore, which reports it as damage)."""
        try:
            stored = _shapes(self.manager.item_metadata(step))
        except Exception:  # unreadable metadata: damage, found by the restore
            return
        wanted = _shapes({"params": params, "opt_state": opt_state})
        if not stored or stored == wanted:
            return
        for name in sorted(set(stored) | set(wanted)):
            if stored.get(name) != wanted.get(name):
                there = "no such array" if name not in stored else f"shape {stored[name]}"
                here = "no such array" if name not in wanted else f"shape {wanted[name]}"
                raise ShapeMismatch(f"checkpoint {step} holds {name} with {there}, the model and optimizer of these "
                                    f"settings have {here}")

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any) -> None:
        """Start writing a checkpoint for `step` (returns once the arrays are copied off the devices). The
        checksums of the checkpoint before it are written in a background thread once that one has committed."""
        self.finish_checksums()
        state = {"params": params, "opt_state": opt_state, "step": step}
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._pending = step
        if jax.process_index() == 0:
            self._hashing = threading.Thread(target=self._checksum_when_committed, args=(step,), daemon=True)
            self._hashing.start()

    def _checksum_when_committed(self, step: int) -> None:
        try:
            self.manager.wait_until_finished()
            start = time.perf_counter()
            step_dir = os.path.join(self.directory, str(step))
            if os.path.isdir(step_dir):  # rotation may already have removed it (keep_checkpoints 1)
                write_checksums(step_dir)
            self.checksum_seconds += time.perf_counter() - start
        except BaseException as err:  # re-raised by finish_checksums in the training thread
            self._hash_error = err

    def raise_failure(self) -> None:
        """Raise the error of the last save's background commit and checksums, if it has failed already."""
        if self._hashing is not None and not self._hashing.is_alive() and self._hash_error is not None:
            self.finish_checksums()

    def finish_checksums(self) -> None:
        """Wait for the checksums of the last save (all processes: a barrier after process 0 wrote them)."""
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None
        if self._hash_error is not None:
            err, self._hash_error = self._hash_error, None
            raise err
        if self._pending is not None and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"xlstm_jax: checksums of step {self._pending}")
        self._pending = None

    def restore(self, step: int, params: Any, opt_state: Any, report: Callable[[str], None] | None = None
                ) -> tuple[Any, Any, int]:
        """Restore (params, opt_state, step) into the structure of the given templates, after checking the files
        against their checksums (IntegrityError; a step without checksums is reported and restored unverified)."""
        self.finish_checksums()
        self.manager.wait_until_finished()
        self.check_shapes(step, params, opt_state)
        if not verify_checksums(os.path.join(self.directory, str(step))) and report is not None:
            report(f"checkpoint {step} has no {CHECKSUMS_FILE} (saved by an older xlstm_jax, or the run stopped "
                   "before they were written): restored without verifying its files")
        target = {"params": params, "opt_state": opt_state, "step": 0}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return restored["params"], restored["opt_state"], int(restored["step"])

    def restore_newest_intact(self, params: Any, opt_state: Any,
                              report: Callable[[str], None]) -> tuple[Any, Any, int] | None:
        """Restore the newest checkpoint that reads back; None when none does.

        Each newer one that does not (files that differ from their checksums, truncated files, a missing item
        folder, …) is reported and moved to `output_dir/damaged-checkpoints/<step>-<time>`: kept for inspection,
        never deleted. So are entries of `checkpoints/` that look like steps but are not directories. A restore
        that fails because the run's model or optimizer has other shapes than the checkpoint is not damage: it
        raises ShapeMismatch and nothing is moved.
        """
        self._put_aside_stray_files(report)
        for step in reversed(self.steps()):
            try:
                return self.restore(step, params, opt_state, report)
            except ShapeMismatch:
                raise
            except IntegrityError as err:
                report(f"checkpoint {step} is damaged ({err}); moved it to {self._put_aside(step)}")
            except Exception as err:  # orbax and TensorStore raise plain Exception for unreadable data
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                report(f"checkpoint {step} is damaged ({reason}); moved it to {self._put_aside(step)}")
        return None

    def _put_aside_stray_files(self, report: Callable[[str], None]) -> None:
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name.isdigit() and not os.path.isdir(path):
                report(f"checkpoints/{name} is a file, not a checkpoint directory; moved it to "
                       f"{self._put_aside(int(name))}")

    def _put_aside(self, step: int) -> str:
        aside = os.path.join(self.output_dir, DAMAGED_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), aside)
        # A fresh manager: a failed restore can leave the old one with a wrong idea of the checkpoints' items.
        self.manager.close()
        self.manager = self._manager()
        return aside

    def abandon(self) -> None:
        """Release the manager after a run stopped with an error: wait for what is in flight, raise nothing."""
        try:
            self.close()
        except Exception:  # the run already reports why it stopped
            pass

    def close(self) -> None:
        """Wait for the last checkpoint and its checksums, then release the manager."""
        self.finish_checksums()
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
