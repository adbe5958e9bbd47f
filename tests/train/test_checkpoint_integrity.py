"""Training checkpoints that rot or do not fit: checksums written after each save commits and verified on resume
(a bit flip, a zeroed block, a stale checksum file), files where step directories belong, checkpoints of another
model shape (a settings error, not damage), and the execution settings a resume may change."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from xlstm_jax import cli
from xlstm_jax.train.checkpoints import CHECKSUMS_FILE, DAMAGED_DIR, IntegrityError, verify_checksums
from xlstm_jax.train.config import TrainConfig
from xlstm_jax.train.loop import train

pytestmark = pytest.mark.slow  # training runs (the module's finished run included)

TINY = dict(vocab_size=16, seq_len=16, num_kv_pairs=2, embedding_dim=32, num_heads=2, num_blocks=1, batch_size=4,
            chunk_size=16, progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 4 and 6 (eval and checkpoints every 2, 2 kept)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    return out, train(TrainConfig(**TINY, steps=6, warmup_steps=1, eval_every=2, output_dir=out))


def _copy(finished, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(finished[0], out)
    return out


def _largest_file(step_dir: str) -> str:
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names
             if name != CHECKSUMS_FILE]
    return max(files, key=os.path.getsize)


def _resume(out: str, capsys) -> tuple[int, str, str]:
    status = cli.main(["train", "--output-dir", out, "--resume", "--steps", "8", "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_every_checkpoint_has_checksums_that_match(finished):
    out = finished[0]
    for step in ("4", "6"):
        step_dir = os.path.join(out, "checkpoints", step)
        assert verify_checksums(step_dir)
        entries = json.load(open(os.path.join(step_dir, CHECKSUMS_FILE)))["files"]
        assert len(entries) >= 3 and all(len(e["xxh3_128"]) == 32 for e in entries.values())


def test_added_and_missing_files_do_not_verify(finished, tmp_path):
    out = _copy(finished, tmp_path)
    newest = os.path.join(out, "checkpoints", "6")
    open(os.path.join(newest, "stray.bin"), "wb").write(b"x")
    with pytest.raises(IntegrityError, match="stray.bin was not there"):
        verify_checksums(newest)
    os.remove(os.path.join(newest, "stray.bin"))
    os.remove(_largest_file(newest))
    with pytest.raises(IntegrityError, match="is missing"):
        verify_checksums(newest)


@pytest.mark.parametrize("damage", ["bit_flips", "zeroed_block", "stale_checksums"])
def test_a_checkpoint_whose_files_changed_is_damaged_and_the_one_before_is_used(finished, tmp_path, capsys, damage):
    """64 flipped bytes in the middle of the largest file (what issue 31 resumed silently), a zeroed block, a
    checksum file from another save: the newest checkpoint is reported damaged, moved aside, and the run resumes
    from step 4."""
    out = _copy(finished, tmp_path)
    newest = os.path.join(out, "checkpoints", "6")
    target = _largest_file(newest)
    if damage in ("bit_flips", "zeroed_block"):
        data = bytearray(open(target, "rb").read())
        middle = len(data) // 2
        for at in range(middle, middle + 64):
            data[at] = data[at] ^ 0xFF if damage == "bit_flips" else 0
        open(target, "wb").write(bytes(data))
    else:
        shutil.copy(os.path.join(out, "checkpoints", "4", CHECKSUMS_FILE), os.path.join(newest, CHECKSUMS_FILE))
    with pytest.raises(IntegrityError):
        verify_checksums(newest)
    status, text, err = _resume(out, capsys)
    assert status == 0, err
    assert "warning: checkpoint 6 is damaged" in text and "resumed from step 4" in text
    [aside] = os.listdir(os.path.join(out, DAMAGED_DIR))
    assert aside.startswith("6-")


def test_a_checkpoint_without_checksums_is_restored_with_a_warning(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    os.remove(os.path.join(out, "checkpoints", "6", CHECKSUMS_FILE))
    status, text, _ = _resume(out, capsys)
    assert status == 0 and "checkpoint 6 has no checksums.json" in text and "resumed from step 6" in text


def test_a_file_where_a_step_directory_belongs_is_reported_and_moved_aside(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    open(os.path.join(out, "checkpoints", "9"), "w").write("not a checkpoint")
    status, text, _ = _resume(out, capsys)
    assert status == 0 and "checkpoints/9 is a file" in text and "resumed from step 6" in text
    assert not os.path.exists(os.path.join(out, "checkpoints", "9"))


def test_a_checkpoint_of_another_model_shape_is_a_settings_error_and_stays(finished, tmp_path, capsys):
    """train_config.json gone and another width asked for: the checkpoints are healthy, so nothing is moved and
    the run stops with one error line naming the mismatch (issue 37 restarted at step 0 and overwrote model/)."""
    out = _copy(finished, tmp_path)
    os.remove(os.path.join(out, "train_config.json"))
    argv = ["train", "--output-dir", out, "--resume", "--vocab-size", "16", "--seq-len", "16", "--num-kv-pairs",
            "2", "--embedding-dim", "64", "--num-heads", "2", "--num-blocks", "1", "--batch-size", "4",
            "--chunk-size", "16", "--steps", "8", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--output-dir" in errors[0] and "shape" in errors[0], err
    assert sorted(os.listdir(os.path.join(out, "checkpoints")), key=int) == ["4", "6"]
    assert not os.path.exists(os.path.join(out, DAMAGED_DIR))


def test_a_resume_on_another_dtype_or_backend_is_announced(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    status = cli.main(["train", "--output-dir", out, "--resume", "--steps", "7", "--dtype", "bfloat16",
                       "--no-progress"])
    text = capsys.readouterr().out
    assert status == 0 and "other execution settings" in text and "compute_dtype 'auto' -> 'bfloat16'" in text
