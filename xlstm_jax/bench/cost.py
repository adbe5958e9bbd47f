"""FLOP and memory-traffic model of the benchmarked operations, and the bf16 peak / HBM bandwidth of known devices.

The mLSTM model (also in docs/benchmarks.md, "Cost model") counts per chunk per (b, h), then times
NC·B·NH with NC = ⌈S/L⌉; every per-op factor F_exp, F_log, F_sig, F_max, F_abs = 1:

Forward FLOPs (upstream mlstm_kernels' roofline count of the chunkwise-parallel form, causal factor F_c = 1/2):
    gates (recurrent)      2L + L(L+1)/2 + 4L + 5
    state numerator        2·d·dv + 2L·d·dv + L·d
    state denominator      2d + 2L·d
    cumulative forget      L(L+1)/2 + 2L
    gate matrix            F_c·(5L² + 2L)
    intra outputs          F_c·(2L²(d + dv) + 3L²)
    inter outputs          2L·d·dv + 3L·d
    output combination     2L·dv + 4L
Forward bytes (upstream's count): recurrent kernel loads L(d + dv)·b + 2L·g and stores (d·dv + d + 1)·g;
parallel kernel loads L(2d + dv)·b + 2L·g + (d·dv + d + 1)·g and stores L·dv·b + 2L·g, with b the q/k/v/h element
size and g = 4 (float32 gates and states).

Backward FLOPs (upstream has no count; xl-chunk as implemented, states recomputed): 10·L·d·dv (recompute
states, dC recurrence, inter parts of dQ, dK, dV) + 6·F_c·L²(d + dv) (three kernels that each rebuild one L×L
product).
Backward bytes (per chunk): recompute reads K, V, i, f and writes C, n, m; the dC pass reads Q, dH, N, M,
f and writes dC; the dV, dK and dQ passes each read two of Q/K/V, dH, one d×dv state, i, f, N, M and write
their gradient; the gate-gradient pass reads Q, K, dQ, dK and writes di, df. fw+bw = forward + backward.

Backends without chunks are evaluated at L = S (native_parallel: one chunk, the quadratic form) and L = 1
(native_recurrent: a state round trip per step, as a `lax.scan` carry does).

Attention (the cuDNN peer, causal): forward 4·B·NH·S²·D·F_c FLOPs, backward 2.5× the forward (five S×S×D
products instead of two); bytes are the ideal traffic: forward reads q, k, v and writes o (plus the float32
log-sum-exp), backward reads q, k, v, o, dO, lse and writes dq, dk, dv.

Recurrent step (decode), per (b, h): 5·d·dv + 8d + 12 FLOPs (C update 3·d·dv, q·C 2·d·dv, n update and q·n);
bytes: C read and written in float32, n and m likewise, q, k, v read and h written in the input dtype, i, f read.
"""

from __future__ import annotations

import dataclasses
import math
import re

F_C = 0.5  # causal factor of the intra-chunk (and attention) terms
STATE_BYTES = 4  # float32 gates, states, cumulative sums


@dataclasses.dataclass(frozen=True)
class Cost:
    """Model FLOPs and bytes of one call."""

    flops: float
    bytes: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def _chunking(S: int, L: int) -> tuple[int, int]:
    """(chunk length used, number of chunks): L capped at S, NC = ⌈S/L⌉ (inputs are padded to whole chunks)."""
    L = max(1, min(L, S))
    return L, -(-S // L)


def mlstm_fw_flops(B: int, NH: int, S: int, d: int, dv: int, L: int, F_c: float = F_C) -> float:
    """Forward FLOPs of the chunkwise mLSTM with chunk size L (module docstring)."""
    L, NC = _chunking(S, L)
    per_chunk = (
        2 * L + L * (L + 1) / 2 + 4 * L + 5  # gates (recurrent part)
        + 2 * d * dv + 2 * L * d * dv + L * d  # state numerator
        + 2 * d + 2 * L * d  # state denominator
        + L * (L + 1) / 2 + 2 * L  # cumulative forget gates (parallel part)
        + F_c * (5 * L * L + 2 * L)  # gate matrix
        + F_c * (2 * L * L * (d + dv) + 3 * L * L)  # intra-chunk outputs
        + 2 * L * d * dv + 3 * L * d  # inter-chunk outputs
        + 2 * L * dv + 4 * L  # output combination
    )
    return B * NH * NC * per_chunk


def mlstm_fw_bytes(B: int, NH: int, S: int, d: int, dv: int, L: int, qkv_bytes: int) -> float:
    """Forward bytes (recurrent kernel + parallel kernel)."""
    L, NC = _chunking(S, L)
    b, g = qkv_bytes, STATE_BYTES
    state = (d * dv + d + 1) * g
    recurrent = L * (d + dv) * b + 2 * L * g + state
    parallel = L * (2 * d + dv) * b + 2 * L * g + state + L * dv * b + 2 * L * g
    return B * NH * NC * (recurrent + parallel)


def mlstm_bw_flops(B: int, NH: int, S: int, d: int, dv: int, L: int, F_c: float = F_C) -> float:
    """Backward FLOPs (xl-chunk as implemented, states recomputed)."""
    L, NC = _chunking(S, L)
    return B * NH * NC * (10 * L * d * dv + 6 * F_c * L * L * (d + dv))


def mlstm_bw_bytes(B: int, NH: int, S: int, d: int, dv: int, L: int, qkv_bytes: int) -> float:
    """Backward bytes (recompute, dC, dV, dK, dQ and gate-gradient passes)."""
    L, NC = _chunking(S, L)
    b, g = qkv_bytes, STATE_BYTES
    c_state = d * dv * g
    recompute = L * (d + dv) * b + 2 * L * g + (d * dv + d + 1) * g
    d_c = L * d * b + L * dv * b + 3 * L * g + c_state
    d_v = 2 * L * d * b + L * dv * b + c_state + 4 * L * g + L * dv * b
    d_k = L * (d + dv) * b + L * dv * b + c_state + 4 * L * g + L * d * b
    d_q = d_k
    gates = 4 * L * d * b + 2 * L * g
    return B * NH * NC * (recompute + d_c + d_v + d_k + d_q + gates)


def mlstm_cost(B: int, NH: int, S: int, d: int, dv: int, L: int, qkv_bytes: int, mode: str) -> Cost:
    """Model cost of one mLSTM call; mode "fw" or "fwbw" (forward + backward)."""
    fw = Cost(mlstm_fw_flops(B, NH, S, d, dv, L), mlstm_fw_bytes(B, NH, S, d, dv, L, qkv_bytes))
    if mode == "fw":
        return fw
    return fw + Cost(mlstm_bw_flops(B, NH, S, d, dv, L), mlstm_bw_bytes(B, NH, S, d, dv, L, qkv_bytes))


def attention_cost(B: int, NH: int, S: int, D: int, qkv_bytes: int, mode: str) -> Cost:
    """Causal softmax attention: matmul FLOPs and ideal traffic (see the module docstring)."""
    fw_flops = 4 * B * NH * S * S * D * F_C
    tokens = B * NH * S
    fw = Cost(fw_flops, 4 * tokens * D * qkv_bytes + tokens * STATE_BYTES)
    if mode == "fw":
        return fw
    return fw + Cost(2.5 * fw_flops, 8 * tokens * D * qkv_bytes + tokens * STATE_BYTES)


def decode_step_cost(B: int, NH: int, d: int, dv: int, qkv_bytes: int) -> Cost:
    """One recurrent step with float32 states (see the module docstring)."""
    flops = 5 * d * dv + 8 * d + 12
    state = 2 * (d * dv + d + 1) * STATE_BYTES
    io = (2 * d + 2 * dv) * qkv_bytes + 2 * STATE_BYTES
    return Cost(B * NH * flops, B * NH * (state + io))


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """Dense bf16 tensor-core peak and HBM bandwidth of a device."""

    name: str
    bf16_flops: float  # FLOP/s
    hbm_bytes: float  # bytes/s


# Ordered: the first pattern that matches the lower-cased `device_kind` wins.
KNOWN_DEVICES: tuple[tuple[str, DevicePeak], ...] = (
    (r"\bh100\b.*\bpcie\b", DevicePeak("H100 PCIe", 756e12, 2.0e12)),
    (r"\bh100\b.*\bnvl\b", DevicePeak("H100 NVL", 835e12, 3.9e12)),
    (r"\bh100\b", DevicePeak("H100 SXM", 989e12, 3.35e12)),
    (r"\bh200\b", DevicePeak("H200", 989e12, 4.8e12)),
    (r"\ba100\b.*80gb.*pcie", DevicePeak("A100 80GB PCIe", 312e12, 1.935e12)),
    (r"\ba100\b.*80gb", DevicePeak("A100 80GB SXM", 312e12, 2.039e12)),
    (r"\ba100\b", DevicePeak("A100 40GB", 312e12, 1.555e12)),
)


def device_peak(device_kind: str) -> DevicePeak | None:
    """The known peak of a `jax.devices()[0].device_kind` string, or None for an unknown device."""
    kind = device_kind.lower().replace("-", " ")
    for pattern, peak in KNOWN_DEVICES:
        if re.search(pattern, kind):
            return peak
    return None


def roofline(cost: Cost, seconds: float, peak: DevicePeak | None) -> dict[str, float | None]:
    """Achieved rates of one measured call and, on a known device, their fractions of the device limits.

    Keys: tflops, tbs (achieved), ai (FLOP/byte), frac_peak, frac_bw (achieved / device limit) and roofline_frac
    = max(FLOPs/peak, bytes/bandwidth) / seconds, the measured time's share of the roofline lower bound.
    """
    out: dict[str, float | None] = {
        "tflops": cost.flops / seconds / 1e12,
        "tbs": cost.bytes / seconds / 1e12,
        "ai": cost.flops / cost.bytes if cost.bytes else math.nan,
        "frac_peak": None,
        "frac_bw": None,
        "roofline_frac": None,
    }
    if peak is not None:
        out["frac_peak"] = cost.flops / seconds / peak.bf16_flops
        out["frac_bw"] = cost.bytes / seconds / peak.hbm_bytes
        out["roofline_frac"] = max(cost.flops / peak.bf16_flops, cost.bytes / peak.hbm_bytes) / seconds
    return out
