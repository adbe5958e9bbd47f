"""Presets (problem sizes) and the benchmark cases built from them.

A case is one implementation at one shape, dtype, chunk size and mode. It is described by a JSON-able spec so the
same measurement runs in this process or in an isolated subprocess (`xlstm_jax.bench.worker`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from xlstm_jax.bench import cost as cost_model

TOKENS = 65536  # tokens per call of the constant-token presets (B·S)
ATTENTION_NH, ATTENTION_DH = 32, 128  # the attention peer's head layout (embedding 4096, like the 7B model)
HEAD_7B = (8, 256, 512)  # NH, DHQK, DHHV of xLSTM-7B


@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem size; x is the value plotted on the horizontal axis (its name: `Preset.x_name`)."""

    B: int
    NH: int
    S: int
    DHQK: int
    DHHV: int
    x: int


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named sweep: "sequence" presets run mLSTM over whole sequences, "decode" runs the recurrent step."""

    name: str
    kind: str  # "sequence" | "decode"
    shapes: tuple[Shape, ...]
    x_name: str
    dtype: str
    description: str


def _const_tokens(NH: int, DHQK: int, DHHV: int, seq_lens: list[int]) -> tuple[Shape, ...]:
    return tuple(Shape(TOKENS // S, NH, S, DHQK, DHHV, S) for S in seq_lens)


def _powers(lo: int, hi: int) -> list[int]:
    return [2**p for p in range(lo.bit_length() - 1, hi.bit_length())]


PRESETS: dict[str, Preset] = {
    "tfla-const-tokens": Preset(
        "tfla-const-tokens", "sequence", _const_tokens(16, 128, 256, _powers(512, 65536)), "S", "bfloat16",
        "65536 tokens, S = 512 … 65536, B = 65536/S, NH=16, DHQK=128, DHHV=256",
    ),
    "7b": Preset(
        "7b", "sequence", _const_tokens(*HEAD_7B, _powers(2048, 32768)), "S", "bfloat16",
        "xLSTM-7B heads (NH=8, DHQK=256, DHHV=512), S = 2048 … 32768, B = 65536/S",
    ),
    "head-dims": Preset(
        "head-dims", "sequence", tuple(Shape(4, 4096 // dh, 8192, dh, dh, dh) for dh in _powers(64, 1024)),
        "DHHV", "bfloat16", "S=8192, B=4, embedding 4096 = NH·DH with DHQK = DHHV = DH = 64 … 1024",
    ),
    "decode": Preset(
        "decode", "decode", tuple(Shape(B, *HEAD_7B[:1], 1, *HEAD_7B[1:], B) for B in _powers(1, 256)), "B",
        "bfloat16", "one recurrent step (float32 states), 7B heads (NH=8, DHQK=256, DHHV=512), B = 1 … 256",
    ),
    "smoke": Preset(
        "smoke", "sequence", tuple(Shape(1, 2, S, 16, 32, S) for S in (32, 64)), "S", "float32",
        "tiny shapes for a CPU check: B=1, NH=2, S = 32, 64, DHQK=16, DHHV=32",
    ),
}


def custom_preset(shapes: list[tuple[int, int, int, int, int]], dtype: str) -> Preset:
    """A sequence preset from explicit (B, NH, S, DHQK, DHHV) shapes; x is the first field that varies."""
    names = ("S", "DHHV", "DHQK", "B", "NH")
    index = {"B": 0, "NH": 1, "S": 2, "DHQK": 3, "DHHV": 4}
    x_name = next((n for n in names if len({s[index[n]] for s in shapes}) > 1), "S")
    built = tuple(Shape(*s, s[index[x_name]]) for s in shapes)
    return Preset("custom", "sequence", built, x_name, dtype, f"explicit shapes {shapes}")


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """'B,NH,S,DHQK,DHHV' -> a tuple of five positive ints; ValueError otherwise."""
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 5 or min(values) < 1:
        raise ValueError(f"--shape must be five positive integers B,NH,S,DHQK,DHHV, got {text!r}.")
    return values  # type: ignore[return-value]


@dataclasses.dataclass
class Case:
    """One measurement: `target` ("module:function") is called with `spec()` and returns the timings."""

    impl: str  # label in tables and plots
    source: str  # "xlstm_jax" or "peer"
    target: str
    model: str  # cost model: "mlstm" | "attention" | "decode"
    shape: Shape
    run_shape: tuple[int, int, int, int, int]  # what actually runs (the attention peer uses its own heads)
    dtype: str
    mode: str  # "fw" | "fwbw"
    chunk: int | None
    model_chunk: int  # L of the cost model
    reps: int
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    isolate: bool = False
    skip: str | None = None  # reason the case is not run
    peer: str = ""  # the peer's name (source "peer"): its cases share one worker process

    def spec(self) -> dict[str, Any]:
        """The JSON-able description the measurement function receives."""
        B, NH, S, DHQK, DHHV = self.run_shape
        return {
            "impl": self.impl, "target": self.target, "B": B, "NH": NH, "S": S, "DHQK": DHQK, "DHHV": DHHV,
            "dtype": self.dtype, "mode": self.mode, "chunk": self.chunk, "reps": self.reps,
            "options": self.options,
        }

    def cost(self) -> cost_model.Cost:
        """Model FLOPs and bytes of this case (see `xlstm_jax.bench.cost`)."""
        B, NH, S, DHQK, DHHV = self.run_shape
        size = jnp.dtype(self.dtype).itemsize
        if self.model == "attention":
            return cost_model.attention_cost(B, NH, S, DHQK, size, self.mode)
        if self.model == "decode":
            return cost_model.decode_step_cost(B, NH, DHQK, DHHV, size)
        return cost_model.mlstm_cost(B, NH, S, DHQK, DHHV, self.model_chunk, size, self.mode)

    def row(self) -> dict[str, Any]:
        """The identifying columns of this case's result row."""
        B, NH, S, DHQK, DHHV = self.run_shape
        return {
            "impl": self.impl, "source": self.source, "mode": self.mode, "dtype": self.dtype, "B": B, "NH": NH,
            "S": S, "DHQK": DHQK, "DHHV": DHHV, "chunk": self.chunk, "x": self.shape.x, "reps": self.reps,
        }


def working_set_bytes(name: str, shape: tuple[int, int, int, int, int], mode: str, qkv_bytes: int) -> float:
    """A rough lower bound of the device memory a case needs: inputs and outputs, plus the O(S²) score matrices
    of native_parallel and the per-step states autodiff keeps for native_recurrent."""
    B, NH, S, DHQK, DHHV = shape
    io = B * NH * S * (2 * DHQK + 2 * DHHV) * qkv_bytes * (2 if mode == "fwbw" else 1)
    if name == "native_parallel":
        return io + 3 * B * NH * S * S * 4 * (2 if mode == "fwbw" else 1)
    if name == "native_recurrent" and mode == "fwbw":
        return io + B * NH * S * DHQK * DHHV * 4
    return io
