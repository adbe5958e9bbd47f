"""scripts/profile_train.py at the tiny size on a CPU: a traced training step with the fused loss and block remat
splits its device time into the categories, finds the LM head, the loss and the optimizer by their named scopes,
and writes the JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.support.devices import ROOT


@pytest.mark.slow
def test_profile_train_splits_a_step_into_categories(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("profile_train", Path(ROOT) / "scripts" / "profile_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "profile.json"
    module.main(["--tiny", "--loss", "fused", "--remat", "block", "--steps", "1", "--reps", "2", "--top", "5",
                 "--json", str(out)])
    row = json.loads(out.read_text())
    assert (row["size"], row["loss"], row["remat"], row["device"]) == ("tiny", "fused", "block", "cpu")
    categories = row["category_ms"]
    assert list(categories) == list(module.CATEGORIES)
    for kind in ("matmul", "lm_head_matmul", "loss", "optimizer"):
        assert categories[kind] > 0, kind
    assert row["step_ms"] > 0 and row["device_busy_ms"] > 0 and row["temp_mb"] > 0
    assert len(row["top_kernels"]) == len(row["top_ops"]) == 5
    assert all(op["category"] in categories and op["ms"] > 0 for op in row["top_ops"])
    # on a CPU the events kept are XLA's thunks, each naming its HLO instruction: none unmatched
    assert row["unmapped"] == []
    printed = capsys.readouterr().out
    assert "host gap" in printed and "optimizer" in printed and "top kernels:" in printed
