"""Launch parameters of the Triton chunkwise kernels, per GPU architecture and shape bucket.

The table lives in launch_table.json beside this file: entries keyed "<arch>/<bucket>" (arch "sm90" for compute
capability 9.0; bucket from the head dims, `shape_bucket`), each with complete parameters and where they were
measured. `scripts/tune_launch.py --write-table` writes the winners of a tuning run into it; nothing is tuned at
run time. A call uses the entry of its device and bucket, else another entry of the same architecture, else the
table's fallback entry (also what Triton's CPU interpreter gets).

Parameters (all ints):
- recurrent_block / recurrent_warps / recurrent_stages: head-dim tile (BK = BV), warps and software-pipelining
  stages of the state recurrences (forward states, backward state cotangents);
- recurrent_programs: the state recurrences split a sequence into groups of chunks walked at once until B·NH·tiles·
  groups reaches this many programs (sequence_groups.py; 1: one walk per sequence);
- block: head-dim tile of the per-chunk kernels; out_v_block: their output (DHHV) tile (limit family);
- parallel_warps (L <= 64) / parallel_warps_l128 (L = 128) / parallel_stages: the limit per-chunk kernels;
- dq_warps: the limit dq kernel. Keep it at 8: with 4, triton 3.6 on H100 miscompiles that kernel for bf16 at
  L=64, DHQK=128, DHHV=256 (dq 80% off, silently; caught by test_gpu_parity_realistic_shape, and the tuner and the
  stage sweeps reject any candidate whose results deviate);
- xl_warps / xl_stages: the xl-chunk per-chunk kernels (their reduction head-dim tile is `block`); xl_out_block:
  the output (DHHV) tile of the xl forward;
- xl_bw_warps / xl_dq_block / xl_dk_block / xl_dv_block: warps and output column tiles of the xl dq, dk and dv
  kernels. Each column block rebuilds its score tiles over the whole other head dim, so a wider block recomputes
  less and holds more registers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax

TABLE_PATH = Path(__file__).with_name("launch_table.json")


def shape_bucket(DHQK: int, DHHV: int) -> str:
    """Head dims up to 256 (e.g. 128/256) or above (e.g. the 7B heads 256/512, up to 1024)."""
    return "dh<=256" if max(DHQK, DHHV) <= 256 else "dh>256"


def device_arch() -> str | None:
    """"sm<major><minor>" of the default device when it is a CUDA GPU, else None."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not capability:
        return None
    return "sm" + str(capability).replace(".", "")


@functools.cache
def load_table(path: Path = TABLE_PATH) -> dict:
    return json.loads(Path(path).read_text())


def table_key(arch: str | None, DHQK: int, DHHV: int, table: dict | None = None) -> str:
    """The entry a call uses: its own "<arch>/<bucket>" (arch None: "cpu", as `write_entry` names it), another
    entry of its architecture, or the fallback."""
    table = table or load_table()
    arch = arch or "cpu"
    own = f"{arch}/{shape_bucket(DHQK, DHHV)}"
    if own in table["entries"]:
        return own
    same_arch = sorted(k for k in table["entries"] if k.split("/")[0] == arch)
    return same_arch[0] if same_arch else table["fallback"]


def table_params(DHQK: int, DHHV: int, arch: str | None = None) -> dict[str, int]:
    """The launch parameters of the table entry for (arch, head dims); arch None: the default device's."""
    key = table_key(arch if arch is not None else device_arch(), DHQK, DHHV)
    return dict(load_table()["entries"][key]["params"])


def write_entry(arch: str | None, DHQK: int, DHHV: int, params: dict[str, int], source: str,
                path: Path = TABLE_PATH) -> str:
    """Store complete `params` as the entry of (arch, bucket) in the table file; returns its key."""
    table = json.loads(Path(path).read_text())
    key = f"{arch or 'cpu'}/{shape_bucket(DHQK, DHHV)}"
    table["entries"][key] = {"source": source, "params": dict(sorted(params.items()))}
    Path(path).write_text(json.dumps(table, indent=1) + "\n")
    load_table.cache_clear()
    return key
