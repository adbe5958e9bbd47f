"""Launch parameters of the Triton chunkwise kernels, per GPU architecture and shape bucket, as typed objects.

The table lives in launch_table.json beside this file: entries keyed "<arch>/<bucket>" (arch "sm90" for compute
capability 9.0; bucket from the head dims, `shape_bucket`), each with where it was measured ("source") and one
section per kernel group: "recurrent" (the state recurrences, recurrence_kernels.RecurrentLaunch) and one per
family ("limit": limit/family.LimitLaunch, "xl": xl/family.XlLaunch). A section's fields are those of its `LaunchParams` class, each
checked when the table loads (`check_table`, run once when the families load): a misspelt, missing or out-of-range
value is an error naming the entry, section and field, never a silent default. `scripts/tune_launch.py
--write-table` writes the winners of a tuning run into it; nothing is tuned at run time. A call uses the entry of
its device and bucket, else another entry of the same architecture, else the table's fallback entry (also what
Triton's CPU interpreter gets). A call's overrides name fields as "section.field" (core.KernelConfig.launch).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Mapping

import jax

from xlstm_jax.kernels.triton.tuning import MAX_HEAD_DIM, WARPS

TABLE_PATH = Path(__file__).with_name("launch_table.json")
MAX_STAGES = 6


def _tile(value: int) -> bool:
    return 16 <= value <= MAX_HEAD_DIM and value & (value - 1) == 0


# field kind -> (check, what it must be)
KINDS = {
    "tile": (_tile, f"a power of two in [16, {MAX_HEAD_DIM}]"),
    "warps": (lambda value: value in WARPS, f"one of {', '.join(map(str, WARPS))}"),
    "stages": (lambda value: 1 <= value <= MAX_STAGES, f"in [1, {MAX_STAGES}]"),
    "count": (lambda value: value >= 1, "a positive integer"),
    "flag": (lambda value: value in (0, 1), "0 or 1"),
}


def param(kind: str) -> dataclasses.Field:
    """A field of a LaunchParams class: "tile" (a head-dim tile, a power of two capped at the head dim by
    core.block), "warps", "stages" (software-pipelining stages of a kernel's loops), "count" or "flag" (0 / 1)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}.")
    return dataclasses.field(metadata={"kind": kind})


@dataclasses.dataclass(frozen=True)
class LaunchParams:
    """Base of a section's typed launch parameters: frozen dataclasses of ints whose fields are declared with
    `param(kind)`; every value is checked on construction."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            check, expected = KINDS[field.metadata["kind"]]
            if isinstance(value, bool) or not isinstance(value, int) or not check(value):
                raise ValueError(f"{field.name} must be {expected}, got {value!r}.")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, int], where: str):
        """The typed section of `raw`; `where` names it in errors (file, entry and section)."""
        names = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected an object of {sorted(names)}, got {raw!r}.")
        unknown, missing = sorted(set(raw) - names), sorted(names - set(raw))
        if unknown or missing:
            wrong = "; ".join(f"{what} fields {fields}" for what, fields in (("unknown", unknown), ("missing", missing))
                              if fields)
            raise ValueError(f"{where}: {wrong}; {cls.__name__} has {sorted(names)}.")
        try:
            return cls(**raw)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def replaced(self, overrides: Mapping[str, int], section: str):
        """This section with `overrides` (field -> value) over it, checked like the table's values."""
        if not overrides:  # the table's own section, checked when it was read
            return self
        return type(self).from_mapping({**dataclasses.asdict(self), **overrides}, f"launch overrides of {section!r}")


def flat(sections: Mapping[str, LaunchParams]) -> dict[str, int]:
    """"section.field" -> value of typed sections (the names a call's overrides use)."""
    return {f"{name}.{field}": value for name, params in sections.items()
            for field, value in dataclasses.asdict(params).items()}


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
    """The table file as JSON; its shape (a fallback among the entries, each with a source) is checked here, its
    sections by `check_table`."""
    table = json.loads(Path(path).read_text())
    entries = table.get("entries")
    if not isinstance(entries, dict) or table.get("fallback") not in entries:
        raise ValueError(f"{path}: needs 'entries' and a 'fallback' naming one of them.")
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise ValueError(f"{path}: entry {key!r} needs a 'source' saying where its values were measured.")
    return table


@functools.cache
def check_table(schema: tuple[tuple[str, type[LaunchParams]], ...], path: Path = TABLE_PATH) -> None:
    """Build every section of every entry with its type in `schema` ((section, LaunchParams class) pairs): raises
    ValueError naming the entry, section and field of the first bad value, or a section missing or unknown."""
    sections = dict(schema)
    for key, entry in load_table(path)["entries"].items():
        present = set(entry) - {"source"}
        if present != set(sections):
            raise ValueError(f"{path}: entry {key!r} has sections {sorted(present)}, expected {sorted(sections)}.")
        for name, cls in sections.items():
            cls.from_mapping(entry[name], f"{path.name} entry {key!r} section {name!r}")


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


@functools.cache
def section(name: str, cls: type[LaunchParams], DHQK: int, DHHV: int, arch: str | None = None) -> LaunchParams:
    """The typed `name` section of the entry for (arch, head dims); arch None: the default device's."""
    key = table_key(arch if arch is not None else device_arch(), DHQK, DHHV)
    return cls.from_mapping(load_table()["entries"][key][name], f"{TABLE_PATH.name} entry {key!r} section {name!r}")


def write_entry(arch: str | None, DHQK: int, DHHV: int, sections: Mapping[str, LaunchParams], source: str,
                path: Path = TABLE_PATH) -> str:
    """Store complete typed `sections` (section name -> LaunchParams) as the entry of (arch, bucket) in the table
    file; returns its key."""
    table = json.loads(Path(path).read_text())
    key = f"{arch or 'cpu'}/{shape_bucket(DHQK, DHHV)}"
    table["entries"][key] = {"source": source, **{name: dataclasses.asdict(params)
                                                  for name, params in sorted(sections.items())}}
    Path(path).write_text(json.dumps(table, indent=1) + "\n")
    load_table.cache_clear()
    check_table.cache_clear()
    section.cache_clear()
    return key
