"""Device events matched to a compiled module's HLO: the instruction table of its text, which instructions are
matmuls, their JAX name stacks, and the device time the events cover. Shared by the profilers
(scripts/profile_train.py, scripts/profile_serve_step.py)."""

from __future__ import annotations

import math
import re

MATMUL_KERNELS = ("gemm", "cublas", "cutlass", "nvjet", "xmma", "matmul")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(([^)]*)\)")
_CONTRACTING = re.compile(r'lhs_contracting_dim(?:s=\{([\d,]*)\}|ensions"\s*:\s*\[([\d",\s]*)\])')


def parse_hlo(text: str) -> dict[str, dict]:
    """Instruction name -> {opcode, op_name (JAX name stack), calls (called computations), target (custom-call
    target), computation, dims (of the result, or of a tuple result's first element), operands (names),
    contracting (a dot's or GEMM custom call's lhs contracting dimensions, else None), body and trip_count (a while
    loop's body computation and known trip count, else None)} of a compiled module's HLO text; computations under
    "computation:NAME" -> {instructions, root, entry}."""
    table: dict[str, dict] = {}
    computation = None
    for line in text.splitlines():
        if line.rstrip().endswith("{") and " = " not in line:
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            table[f"computation:{computation}"] = {"instructions": [], "root": None, "entry": line.startswith("ENTRY")}
            continue
        match = _INSTRUCTION.match(line)
        if match is None or computation is None:
            continue
        root, name, shape, opcode, operands = match.groups()
        stack = re.search(r'op_name="([^"]*)"', line)
        target = re.search(r'custom_call_target="([^"]*)"', line)
        dims = re.search(r"\[([\d,]*)\]", shape)
        contracting = _CONTRACTING.search(line)
        trips = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', line)
        table[name] = {"opcode": opcode, "op_name": stack[1] if stack else "",
                       "calls": re.findall(r"(?:calls|body|condition|to_apply|true_computation|false_computation)"
                                           r"=%?([\w.\-]+)", line) + _branches(line),
                       "body": body[1] if (body := re.search(r"body=%?([\w.\-]+)", line)) else None,
                       "target": target[1] if target else "", "computation": computation,
                       "dims": [int(d) for d in dims[1].split(",") if d] if dims else [],
                       "operands": re.findall(r"%([\w.\-]+)", operands),
                       "contracting": None if contracting is None else
                       [int(d) for d in re.findall(r"\d+", contracting[1] or contracting[2])],
                       "trip_count": int(trips[1]) if trips else None}
        table[f"computation:{computation}"]["instructions"].append(name)
        if root:
            table[f"computation:{computation}"]["root"] = name
    return table


def _branches(line: str) -> list[str]:
    listed = re.search(r"branch_computations=\{([^}]*)\}", line)
    return re.findall(r"%?([\w.\-]+)", listed[1]) if listed else []


def is_matmul(hlo: dict[str, dict], name: str, seen: set | None = None) -> bool:
    info = hlo.get(name)
    if info is None:
        return False
    if info["opcode"] in ("dot", "convolution") or any(k in info["target"].lower() for k in MATMUL_KERNELS):
        return True
    seen = set() if seen is None else seen
    if info["opcode"] != "fusion" or name in seen:
        return False
    seen.add(name)
    return any(is_matmul(hlo, inner, seen) for called in info["calls"]
               for inner in hlo.get(f"computation:{called}", {}).get("instructions", ()))


def matmul_flops(hlo: dict[str, dict], name: str) -> int:
    """Floating-point operations of one run of instruction `name`'s matmuls: 2 x (result elements) x (contracted
    size) of a dot or GEMM custom call, summed over the instructions of a fusion's computation; 0 for the rest."""
    info = hlo.get(name)
    if info is None:
        return 0
    if info["contracting"] is not None and info["operands"]:
        lhs = hlo.get(info["operands"][0], {}).get("dims", [])
        if all(d < len(lhs) for d in info["contracting"]):
            return 2 * math.prod(info["dims"]) * math.prod(lhs[d] for d in info["contracting"])
        return 0
    if info["opcode"] != "fusion":
        return 0
    return sum(matmul_flops(hlo, inner) for called in info["calls"]
               for inner in hlo.get(f"computation:{called}", {}).get("instructions", ()))


def module_matmul_flops(hlo: dict[str, dict]) -> int:
    """Floating-point operations of the matmuls of one run of the module's entry computation: `matmul_flops` of
    each instruction, a while loop's body times its known trip count (once where unknown), a conditional's
    costliest branch. Needs no trace: where the profiler cannot tell which instruction an event ran (kernels
    inside XLA's command buffers), the step's matmul rate is this over the matmul kernels' device time."""
    def computation(name: str) -> int:
        return sum(instruction(inner) for inner in hlo.get(f"computation:{name}", {}).get("instructions", ()))

    def instruction(name: str) -> int:
        info = hlo[name]
        if info["opcode"] == "while":
            return (info["trip_count"] or 1) * computation(info["body"])
        if info["opcode"] == "conditional":
            return max((computation(c) for c in info["calls"]), default=0)
        if info["opcode"] == "call":
            return sum(computation(c) for c in info["calls"])
        return matmul_flops(hlo, name)

    entries = [k.split(":", 1)[1] for k, v in hlo.items() if k.startswith("computation:") and v["entry"]]
    return sum(computation(name) for name in entries)


def op_name(hlo: dict[str, dict], name: str) -> str:
    """The instruction's JAX name stack; a fusion without one takes its root's (or its first named one's)."""
    info = hlo.get(name, {})
    if info.get("op_name") or info.get("opcode") != "fusion":
        return info.get("op_name", "")
    for called in info["calls"]:
        comp = hlo.get(f"computation:{called}", {})
        names = [comp.get("root")] + comp.get("instructions", [])
        named = [hlo[n]["op_name"] for n in names if n in hlo and hlo[n]["op_name"]]
        if named:
            return named[0]
    return ""


def instruction_of(event: dict, hlo: dict[str, dict]) -> str | None:
    """The HLO instruction an event ran: its `hlo_op`, or its kernel name (XLA names a fusion's kernel after it,
    with "_N" for ".N")."""
    name = event["name"]
    for candidate in (event.get("args", {}).get("hlo_op"), name, re.sub(r"_(\d+)$", r".\1", name)):
        if candidate in hlo:
            return candidate
    return None


def busy_us(events: list[dict]) -> float:
    """Microseconds covered by at least one event (the union of their intervals)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total
