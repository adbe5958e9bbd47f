"""Peers measured beside xlstm_jax's backends, each only where it can run, each in its own subprocess.

Nothing here is a dependency: a peer whose package is missing is listed as "not installed", one that needs a CUDA
GPU elsewhere as "needs a CUDA GPU". Upstream entry points (NX-AI/mlstm_kernels): the JAX kernels
`mlstm_kernels.jax.chunkwise.{triton_xl_chunk, triton_limit_chunk, native}`, the JAX step kernels
`mlstm_kernels.jax.recurrent.{native_step, triton_step}` and the PyTorch Triton kernels
`mlstm_kernels.torch.chunkwise.{triton_limit_chunk, triton_xl_chunk}`. The package's `jax.chunkwise` and
`jax.recurrent` packages import their Triton modules on import, so even its native JAX kernels need jax_triton
(which imports only with a CUDA jaxlib).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax

MEASURE = "xlstm_jax.bench.measure"


@dataclasses.dataclass(frozen=True)
class Peer:
    """One peer implementation.

    kind: the presets it joins ("sequence" or "decode"); target: the measurement function; model: its cost model
    ("mlstm", "attention", "decode"); fn: the kernel it measures ("module:function"), passed in the spec options;
    requires: top-level modules that must be importable; chunk: default chunk size (None: not chunked) and
    chunk_range the sizes it takes; dtypes: the input dtypes it takes (None: any).
    """

    kind: str
    target: str
    model: str
    description: str
    fn: str | None = None
    requires: tuple[str, ...] = ()
    needs_gpu: bool = True
    chunk: int | None = None
    chunk_range: tuple[int, int] | None = None
    dtypes: tuple[str, ...] | None = None


_MK = "mlstm_kernels"
_JAX_CW = "mlstm_kernels.jax.chunkwise"
_TORCH_CW = "mlstm_kernels.torch.chunkwise"

PEERS: dict[str, Peer] = {
    "cudnn_attention": Peer(
        "sequence", f"{MEASURE}:measure_attention", "attention",
        "jax.nn.dot_product_attention(implementation='cudnn'), causal, NH=32, DH=128, same tokens",
        dtypes=("bfloat16", "float16"),
    ),
    "mk_jax_xl_chunk": Peer(
        "sequence", f"{MEASURE}:measure_upstream_jax", "mlstm", "mlstm_kernels JAX Triton xl-chunk",
        f"{_JAX_CW}.triton_xl_chunk:mlstm_chunkwise__xl_chunk", (_MK, "jax_triton"), True, 128, (16, 2048),
    ),
    "mk_jax_limit_chunk": Peer(
        "sequence", f"{MEASURE}:measure_upstream_jax", "mlstm", "mlstm_kernels JAX Triton limit-chunk",
        f"{_JAX_CW}.triton_limit_chunk:mlstm_chunkwise__limit_chunk", (_MK, "jax_triton"), True, 64, (16, 128),
    ),
    "mk_jax_native": Peer(
        "sequence", f"{MEASURE}:measure_upstream_jax", "mlstm", "mlstm_kernels JAX native chunkwise (XLA)",
        f"{_JAX_CW}.native:mlstm_chunkwise__native_autograd", (_MK, "jax_triton"), True, 64, (16, 512),
    ),
    "mk_torch_limit_chunk": Peer(
        "sequence", "xlstm_jax.bench.torch_peer:measure_torch", "mlstm", "mlstm_kernels PyTorch Triton limit-chunk",
        f"{_TORCH_CW}.triton_limit_chunk:mlstm_chunkwise__limit_chunk", (_MK, "torch"), True, 64, (16, 128),
    ),
    "mk_torch_xl_chunk": Peer(
        "sequence", "xlstm_jax.bench.torch_peer:measure_torch", "mlstm", "mlstm_kernels PyTorch Triton xl-chunk",
        f"{_TORCH_CW}.triton_xl_chunk:mlstm_chunkwise__xl_chunk", (_MK, "torch"), True, 128, (16, 2048),
    ),
    "mk_jax_native_step": Peer(
        "decode", f"{MEASURE}:measure_decode", "decode", "mlstm_kernels JAX native recurrent step",
        "mlstm_kernels.jax.recurrent.native_step:mlstm_recurrent_step__native_fw", (_MK, "jax_triton"), True,
    ),
    "mk_jax_triton_step": Peer(
        "decode", f"{MEASURE}:measure_decode", "decode", "mlstm_kernels JAX Triton recurrent step",
        "mlstm_kernels.jax.recurrent.triton_step:mlstm_recurrent_step__triton_fw", (_MK, "jax_triton"), True,
    ),
}


def peer_availability(peer: Peer) -> tuple[bool, str]:
    """(can run here, why not); why starts with "not installed" when a required module is missing."""
    missing = [m for m in peer.requires if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"not installed: {', '.join(missing)}"
    if peer.needs_gpu and jax.default_backend() != "gpu":
        return False, f"needs a CUDA GPU (JAX backend is {jax.default_backend()!r})"
    return True, ""
