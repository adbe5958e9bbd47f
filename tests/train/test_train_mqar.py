"""MQAR training: the task generator, a short run that clearly beats chance, exact resume from orbax checkpoints,
and the `xlstm-jax train` / `xlstm-jax generate` argument wiring."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from xlstm_jax.generate_cli import add_generate_arguments, run_generate
from xlstm_jax.train.cli import add_train_arguments, run_train
from xlstm_jax.train.config import TrainConfig
from xlstm_jax.train.loop import train
from xlstm_jax.train.mqar import MQARConfig, mqar_batch

pytestmark = pytest.mark.slow  # training runs

TINY = dict(vocab_size=16, seq_len=16, num_kv_pairs=2, embedding_dim=32, num_heads=2, num_blocks=1, batch_size=4,
            chunk_size=16, progress=False)


def test_mqar_batch_targets_are_the_bound_values():
    task = MQARConfig(vocab_size=20, seq_len=24, num_kv_pairs=4, num_queries=5)
    batch = jax.device_get(mqar_batch(jax.random.key(0), task, 8))
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (8, 24)
    assert np.array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    for row in range(8):
        keys, values = batch["inputs"][row, 0:8:2], batch["inputs"][row, 1:8:2]
        assert len(set(keys)) == 4 and all(1 <= k <= task.num_keys for k in keys)
        assert all(task.num_keys < v < 20 for v in values)
        positions = np.nonzero(batch["mask"][row])[0]
        assert len(positions) == 5 and np.all(positions >= 8)
        binding = dict(zip(keys.tolist(), values.tolist()))
        for p in positions:
            assert batch["targets"][row, p] == binding[int(batch["inputs"][row, p])]
    assert task.chance_accuracy == 1 / 10
    with pytest.raises(ValueError, match="too short|no room"):
        MQARConfig(vocab_size=20, seq_len=8, num_kv_pairs=4)
    with pytest.raises(ValueError, match="needs at least that many keys"):
        MQARConfig(vocab_size=7, seq_len=40, num_kv_pairs=4)


def test_short_training_run_clearly_beats_chance():
    config = TrainConfig(vocab_size=32, seq_len=32, num_kv_pairs=4, embedding_dim=32, num_heads=2, num_blocks=2,
                         steps=150, warmup_steps=20, learning_rate=1e-2, batch_size=32, eval_every=150,
                         chunk_size=16, progress=False)
    result = train(config)
    assert result.step == 150 and result.chance_accuracy == 1 / 16
    assert result.eval_accuracy > 3 * result.chance_accuracy
    assert result.history[-1]["eval_loss"] < np.log(16)
    assert result.tokens_per_second > 0


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_resume_from_an_orbax_checkpoint_continues_the_run_exactly(tmp_path):
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    config = TrainConfig(**TINY, steps=6, warmup_steps=1, eval_every=3, output_dir=straight_dir)
    straight = train(config)
    assert sorted(os.listdir(os.path.join(straight_dir, "checkpoints"))) == ["3", "6"]
    assert os.path.exists(os.path.join(straight_dir, "model", "config.json"))
    shutil.copytree(straight_dir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "6"))
    with pytest.raises(ValueError, match="already holds a run"):
        train(TrainConfig(**TINY, steps=6, warmup_steps=1, eval_every=3, output_dir=resumed_dir))
    with pytest.raises(ValueError, match="differs from the run"):
        train(TrainConfig(**{**TINY, "seed": 1}, steps=6, warmup_steps=1, eval_every=3, output_dir=resumed_dir,
                          resume=True))
    resumed = train(TrainConfig(**TINY, steps=6, warmup_steps=1, eval_every=3, output_dir=resumed_dir, resume=True))
    assert resumed.step == 6 and [h["step"] for h in resumed.history] == [6]
    assert all(np.array_equal(a, b) for a, b in zip(_params(resumed.model), _params(straight.model)))
    assert resumed.eval_accuracy == straight.eval_accuracy
    further = train(TrainConfig(**TINY, steps=8, warmup_steps=1, eval_every=3, output_dir=resumed_dir,
                                resume=True))
    assert further.step == 8 and [h["step"] for h in further.history] == [8]


def test_cli_train_then_generate(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    defaults = parser.parse_args([])
    assert TrainConfig(**{k: v for k, v in vars(defaults).items() if k != "json_out"}) == TrainConfig()
    out_dir = str(tmp_path / "run")
    args = parser.parse_args(["--vocab-size", "16", "--seq-len", "16", "--num-kv-pairs", "2", "--embedding-dim",
                              "32", "--num-blocks", "1", "--batch-size", "4", "--steps", "4", "--warmup-steps", "1",
                              "--eval-every", "4", "--chunk-size", "16", "--output-dir", out_dir, "--no-progress",
                              "--json"])
    assert run_train(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and 0.0 <= summary["eval_accuracy"] <= 1.0
    assert run_train(parser.parse_args(["--steps", "10", "--warmup-steps", "10"])) == 2

    gen = argparse.ArgumentParser()
    add_generate_arguments(gen)
    assert run_generate(gen.parse_args([out_dir, "--num-examples", "3", "--dtype", "float32"])) == 0
    assert "recalled" in capsys.readouterr().out
    assert run_generate(gen.parse_args([out_dir, "--prompt-ids", "1 9 2 12", "--prompt-ids", "3,4",
                                        "--max-new-tokens", "3", "--dtype", "float32"])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("prompt [1, 9, 2, 12] -> ")
    assert run_generate(gen.parse_args([str(tmp_path / "missing"), "--prompt-ids", "1"])) == 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2])
def test_the_main_job_forms_the_recall_circuit_for_every_seed(seed):
    """The README's main job (every default but the length) for seed 0 (the default) and 2 (the slowest to
    converge), shortened from 3000 to 600 steps: the recall circuit forms by step ~500 for each (docs/training.md has
    all five seeds of the full job; two here keep the CI run well under its 20 minutes). With the xLSTM-7B gate initialisation and
    the old defaults, accuracy sat at 0.35-0.48 until step 2500-8000, and 0.94 after 12000 steps for seed 0."""
    result = train(TrainConfig(steps=600, seed=seed, progress=False))
    assert result.eval_accuracy >= 0.97, result.history
