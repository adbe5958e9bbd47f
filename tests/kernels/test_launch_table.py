"""The per-architecture launch table: lookup order, completeness, and what the tuner writes into it."""

import json
import shutil

import pytest

from tests.support.helpers import xl_chunk
from xlstm_jax.kernels.triton import launch_table, core as triton_core, families as triton_families
from xlstm_jax.kernels.triton.recurrence_kernels import RecurrentLaunch


def _table_with(tmp_path, edit):
    """A copy of the checked-in table with `edit(table)` applied (it mutates the JSON object), as a path."""
    table = json.loads(launch_table.TABLE_PATH.read_text())
    edit(table)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    return path


SCHEMA = (("recurrent", RecurrentLaunch), *((name, family.launch_type)
                                                         for name, family in triton_families.families().items()))


def test_every_entry_has_a_typed_section_per_kernel_group_and_the_fallback_exists():
    table = launch_table.load_table()
    assert table["fallback"] in table["entries"]
    launch_table.check_table(SCHEMA)  # what the families run when they load
    for key, entry in table["entries"].items():
        arch, bucket = key.split("/")
        assert arch.startswith("sm") and bucket in ("dh<=256", "dh>256") and entry["source"]
        assert set(entry) == {"source", "recurrent", "limit", "xl"}, key
        assert entry["limit"]["dq_warps"] == 8  # see the miscompile note in limit/family.py


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t["entries"]["sm90/dh>256"]["xl"].update(bw_warps=3), r"'sm90/dh>256' section 'xl': bw_warps must be one of"),
        (lambda t: t["entries"]["sm90/dh>256"]["limit"].update(block=48), r"section 'limit': block must be a power of two"),
        (lambda t: t["entries"]["sm90/dh<=256"]["recurrent"].update(programs=0), r"programs must be a positive"),
        (lambda t: t["entries"]["sm90/dh<=256"]["recurrent"].update(stages=True), r"stages must be in \[1, 6\], got True"),
        (lambda t: t["entries"]["sm90/dh<=256"]["limit"].update(warpz=4), r"unknown fields \['warpz'\]"),
        (lambda t: t["entries"]["sm90/dh<=256"]["xl"].pop("dv_block"), r"missing fields \['dv_block'\]"),
        (lambda t: t["entries"]["sm90/dh<=256"].pop("xl"), r"has sections \['limit', 'recurrent'\], expected"),
    ],
)
def test_a_bad_value_in_the_table_is_an_error_naming_entry_section_and_field(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        launch_table.check_table(SCHEMA, _table_with(tmp_path, edit))


def test_a_table_without_its_fallback_entry_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'fallback' naming one of them"):
        launch_table.load_table(_table_with(tmp_path, lambda t: t.update(fallback="sm80/dh<=256")))


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


def test_a_calls_overrides_win_over_the_table_are_checked_and_are_part_of_its_configuration():
    plain = triton_families.config("limit", 64, "float32")
    cfg = plain.with_launch({"recurrent.warps": 4, "limit.out_v_block": 64})
    params = triton_core.launch_params(128, 256, cfg)
    table = triton_core.launch_params(128, 256, plain)
    assert (params["recurrent"].warps, params["limit"].out_v_block) == (4, 64)
    assert params["recurrent"].block == table["recurrent"].block and params["limit"].warps == table["limit"].warps
    assert cfg != plain and hash(cfg) == hash(cfg.with_launch())
    with pytest.raises(ValueError, match=r"unknown fields \['wraps'\]"):
        triton_core.launch_params(128, 256, plain.with_launch({"recurrent.wraps": 4}))
    with pytest.raises(ValueError, match=r"'xl.warps' must be one of \['recurrent.<field>', 'limit.<field>'\]"):
        triton_core.launch_params(128, 256, plain.with_launch({"xl.warps": 4}))
    with pytest.raises(ValueError, match=r"warps must be one of 1, 2, 4, 8, 16, got 3"):
        triton_core.launch_params(128, 256, plain.with_launch({"limit.warps": 3}))


def test_write_entry_stores_complete_typed_sections(tmp_path):
    path = tmp_path / "table.json"
    shutil.copy(launch_table.TABLE_PATH, path)
    sections = {name: launch_table.section(name, cls, 256, 512, "sm90") for name, cls in SCHEMA}
    sections["recurrent"] = sections["recurrent"].replaced({"warps": 2}, "recurrent")
    key = launch_table.write_entry("sm90", 256, 512, sections, "a test run", path)
    stored = json.loads(path.read_text())["entries"][key]
    assert key == "sm90/dh>256" and stored["source"] == "a test run" and stored["recurrent"]["warps"] == 2
    assert stored["xl"] == json.loads(launch_table.TABLE_PATH.read_text())["entries"][key]["xl"]
    assert "sm90/dh<=256" in json.loads(path.read_text())["entries"]  # other entries untouched
    launch_table.check_table(SCHEMA, path)


@pytest.mark.slow
@pytest.mark.parametrize("num_warps", [None, 2])
def test_the_xl_backward_kernels_launch_with_their_own_column_tiles_and_warps(monkeypatch, num_warps):
    """Each xl backward kernel gets its table column tile (capped at the head dim) and xl.bw_warps; an explicit
    num_warps overrides the table for every xl kernel."""
    import jax
    import jax.numpy as jnp
    from tests.support.helpers import make_inputs


    launch = {"xl.dq_block": 16, "xl.dk_block": 64, "xl.dv_block": 32, "xl.bw_warps": 8, "xl.warps": 1}
    from xlstm_jax.kernels.triton.xl import family as xl_family

    seen, real = {}, xl_family.launch

    def recording(kernel, *args, **kwargs):
        seen[kernel.__name__] = kwargs
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(xl_family, "launch", recording)
    q, k, v, i, f = (jnp.asarray(x) for x in make_inputs(0, 1, 1, 32, 32, 48).values())
    cfg = triton_families.config("xl", 32, "float32", (16, 16, None)).with_launch(launch)
    if num_warps is None:  # the launch parameters of the call's configuration
        c0, n0, m0 = jnp.zeros((1, 1, 32, 48)), jnp.zeros((1, 1, 32)), jnp.zeros((1, 1))
        jax.grad(lambda q: triton_core.mlstm_triton_core(q, k, v, i, f, c0, n0, m0, cfg)[0].sum())(q)
    else:  # the public function's num_warps: every xl kernel
        jax.grad(lambda q: xl_chunk(q, k, v, i, f, chunk_size=32, tile_q=16, tile_kv=16,
                                                           num_warps=num_warps).sum())(q)
        launch = triton_families.table_launch("xl", 32, 48)
    bw = num_warps or 8
    assert seen["mlstm_xl_fw_parallel_kernel"]["num_warps"] == (num_warps or 1)
    block = triton_core.block  # the column tile: the head dim's power of two, capped by the launch parameter
    assert seen["mlstm_xl_bw_dq_kernel"]["BK"] == block(32, launch["xl.dq_block"])
    assert seen["mlstm_xl_bw_dk_kernel"]["BO"] == block(32, launch["xl.dk_block"])
    assert seen["mlstm_xl_bw_dv_kernel"]["BO"] == block(48, launch["xl.dv_block"])
    assert all(seen[f"mlstm_xl_bw_{n}_kernel"]["num_warps"] == bw for n in ("dq", "dk", "dv"))
    if num_warps is None:
        assert (seen["mlstm_xl_bw_dq_kernel"]["BK"], seen["mlstm_xl_bw_dk_kernel"]["BO"]) == (16, 32)


def test_the_package_data_ships_the_table_from_where_it_lives():
    """A regular (non-editable) install copies only the package data pyproject.toml names: it must name the package
    that holds launch_table.json (it named a package the table had left)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    holders = {package for package, files in package_data.items() if "launch_table.json" in files}
    here = launch_table.TABLE_PATH.parent.relative_to(root)
    assert holders == {".".join(here.parts)}
