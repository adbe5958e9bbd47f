"""The per-architecture launch table: lookup order, completeness, and what the tuner writes into it."""

import json
import shutil

import pytest

from xlstm_jax.kernels.mlstm_chunkwise import launch_table, triton_core

READ_BY_THE_KERNELS = {
    "recurrent_block", "recurrent_warps", "recurrent_stages", "block", "out_v_block", "parallel_warps",
    "parallel_warps_l128", "dq_warps", "parallel_stages", "xl_warps", "xl_out_block", "xl_stages", "xl_bw_warps",
    "xl_dq_block", "xl_dk_block", "xl_dv_block",
}


def test_every_entry_is_complete_and_the_fallback_exists():
    table = launch_table.load_table()
    assert table["fallback"] in table["entries"]
    for key, entry in table["entries"].items():
        arch, bucket = key.split("/")
        assert arch.startswith("sm") and bucket in ("dh<=256", "dh>256") and entry["source"]
        assert set(entry["params"]) == READ_BY_THE_KERNELS, key
        assert all(isinstance(v, int) and v > 0 for v in entry["params"].values())
        assert entry["params"]["dq_warps"] == 8  # see the miscompile note in launch_table.py


@pytest.mark.parametrize(
    "arch, dims, expected",
    [
        ("sm90", (128, 256), "sm90/dh<=256"),  # its own entry
        ("sm90", (256, 512), "sm90/dh>256"),
        ("sm80", (256, 512), "sm80/dh<=256"),  # same architecture, the other bucket
        ("sm100", (128, 256), "sm90/dh<=256"),  # unknown architecture: the fallback
        (None, (64, 64), "sm90/dh<=256"),  # the CPU interpreter: the fallback
    ],
)
def test_lookup_prefers_the_device_then_its_architecture_then_the_fallback(arch, dims, expected):
    table = {"fallback": "sm90/dh<=256",
             "entries": {k: {} for k in ("sm90/dh<=256", "sm90/dh>256", "sm80/dh<=256")}}
    assert launch_table.table_key(arch, *dims, table) == expected


def test_overrides_win_over_the_table(monkeypatch):
    monkeypatch.setitem(triton_core.LAUNCH, "recurrent_warps", 4)
    params = triton_core.launch_params(128, 256)
    assert params["recurrent_warps"] == 4
    assert params["block"] == launch_table.table_params(128, 256)["block"]


def test_write_entry_stores_complete_params(tmp_path):
    path = tmp_path / "table.json"
    shutil.copy(launch_table.TABLE_PATH, path)
    params = {**launch_table.table_params(256, 512), "recurrent_warps": 2}
    key = launch_table.write_entry("sm90", 256, 512, params, "a test run", path)
    stored = json.loads(path.read_text())["entries"][key]
    assert key == "sm90/dh>256" and stored == {"source": "a test run", "params": dict(sorted(params.items()))}
    assert "sm90/dh<=256" in json.loads(path.read_text())["entries"]  # other entries untouched
