"""The per-architecture launch table: lookup order, completeness, and what the tuner writes into it."""

import json
import shutil

import pytest

from tests.support.helpers import xl_chunk
from xlstm_jax.kernels.triton import launch_table, core as triton_core, families as triton_families


READ_BY_THE_KERNELS = {
    "recurrent_block", "recurrent_warps", "recurrent_stages", "recurrent_programs", "block", "out_v_block",
    "parallel_warps", "parallel_warps_l128", "dq_warps", "parallel_stages", "xl_warps", "xl_out_block", "xl_stages",
    "xl_bw_warps", "xl_dq_block", "xl_dk_block", "xl_dv_block",
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


def test_a_calls_overrides_win_over_the_table_and_are_part_of_its_configuration():
    cfg = triton_families.config("limit", 64, "float32").with_launch(recurrent_warps=4)
    params = triton_core.launch_params(128, 256, cfg.launch)
    assert params["recurrent_warps"] == 4
    assert params["block"] == launch_table.table_params(128, 256)["block"]
    assert cfg != triton_families.config("limit", 64, "float32") and hash(cfg) == hash(cfg.with_launch())
    with pytest.raises(ValueError, match=r"unknown launch parameters \['recurent_warps'\]"):
        triton_core.launch_params(128, 256, (("recurent_warps", 4),))


def test_write_entry_stores_complete_params(tmp_path):
    path = tmp_path / "table.json"
    shutil.copy(launch_table.TABLE_PATH, path)
    params = {**launch_table.table_params(256, 512), "recurrent_warps": 2}
    key = launch_table.write_entry("sm90", 256, 512, params, "a test run", path)
    stored = json.loads(path.read_text())["entries"][key]
    assert key == "sm90/dh>256" and stored == {"source": "a test run", "params": dict(sorted(params.items()))}
    assert "sm90/dh<=256" in json.loads(path.read_text())["entries"]  # other entries untouched


@pytest.mark.slow
@pytest.mark.parametrize("num_warps", [None, 2])
def test_the_xl_backward_kernels_launch_with_their_own_column_tiles_and_warps(monkeypatch, num_warps):
    """Each xl backward kernel gets its table column tile (capped at the head dim) and xl_bw_warps; an explicit
    num_warps overrides the table for every xl kernel."""
    import jax
    import jax.numpy as jnp
    from tests.support.helpers import make_inputs


    launch = {"xl_dq_block": 16, "xl_dk_block": 64, "xl_dv_block": 32, "xl_bw_warps": 8, "xl_warps": 1}
    from xlstm_jax.kernels.triton.xl import family as xl_family

    seen, real = {}, xl_family.launch

    def recording(kernel, *args, **kwargs):
        seen[kernel.__name__] = kwargs
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(xl_family, "launch", recording)
    q, k, v, i, f = (jnp.asarray(x) for x in make_inputs(0, 1, 1, 32, 32, 48).values())
    cfg = triton_families.config("xl", 32, "float32", (16, 16, None)).with_launch(**launch)
    if num_warps is None:  # the launch parameters of the call's configuration
        c0, n0, m0 = jnp.zeros((1, 1, 32, 48)), jnp.zeros((1, 1, 32)), jnp.zeros((1, 1))
        jax.grad(lambda q: triton_core.mlstm_triton_core(q, k, v, i, f, c0, n0, m0, cfg)[0].sum())(q)
    else:  # the public function's num_warps: every xl kernel
        jax.grad(lambda q: xl_chunk(q, k, v, i, f, chunk_size=32, tile_q=16, tile_kv=16,
                                                           num_warps=num_warps).sum())(q)
        launch_table_blocks = triton_core.launch_params(32, 48)
        launch = {name: launch_table_blocks[name] for name in ("xl_dq_block", "xl_dk_block", "xl_dv_block")}
    bw = num_warps or 8
    assert seen["mlstm_xl_fw_parallel_kernel"]["num_warps"] == (num_warps or 1)
    block = triton_core.block  # the column tile: the head dim's power of two, capped by the launch parameter
    assert seen["mlstm_xl_bw_dq_kernel"]["BK"] == block(32, launch["xl_dq_block"])
    assert seen["mlstm_xl_bw_dk_kernel"]["BO"] == block(32, launch["xl_dk_block"])
    assert seen["mlstm_xl_bw_dv_kernel"]["BO"] == block(48, launch["xl_dv_block"])
    assert all(seen[f"mlstm_xl_bw_{n}_kernel"]["num_warps"] == bw for n in ("dq", "dk", "dv"))
    if num_warps is None:
        assert (seen["mlstm_xl_bw_dq_kernel"]["BK"], seen["mlstm_xl_bw_dk_kernel"]["BO"]) == (16, 32)
