"""The limit-chunk family's per-chunk kernels behind core.py: one L x L tile per chunk in registers, chunk
sizes 16..128. Forward: fw_kernels.mlstm_fw_parallel_kernel; backward: bw_kernels' dq and fused dk/dv kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.launch import launch
from xlstm_jax.kernels.triton.core import KernelConfig, Operands, block, gradient_consts, output_consts
from xlstm_jax.kernels.triton.limit.bw_kernels import mlstm_bw_dkdv_kernel, mlstm_bw_dq_kernel
from xlstm_jax.kernels.triton.limit.fw_kernels import mlstm_fw_parallel_kernel


@dataclasses.dataclass(frozen=True)
class LimitFamily:
    name: str = "limit"

    def configure(self, chunk_size: int, tiles) -> dict:
        if any(t is not None for t in tiles):
            raise ValueError(f"the limit family takes no tiles (tile_q, tile_kv, inter_chunk_size), got {tiles}.")
        return {}

    @staticmethod
    def _run(cfg: KernelConfig, p: dict[str, int], warps: int | None = None) -> dict[str, int]:
        if warps is None:
            warps = p["parallel_warps"] if cfg.chunk_size <= 64 else p["parallel_warps_l128"]
        return dict(num_warps=warps, num_stages=p["parallel_stages"])

    @staticmethod
    def warps_fields(num_warps: int) -> dict[str, int]:
        return dict(parallel_warps=num_warps, parallel_warps_l128=num_warps, dq_warps=num_warps)

    def outputs(self, x: Operands, cfg: KernelConfig, p: dict[str, int], out_dtype):
        BH, S, DHQK, DHHV = x.dims
        BV = block(DHHV, p["out_v_block"])
        outs = [jax.ShapeDtypeStruct((BH, S, DHHV), out_dtype), jax.ShapeDtypeStruct((BH, S), jnp.float32),
                jax.ShapeDtypeStruct((BH, S), jnp.float32)]
        return launch(mlstm_fw_parallel_kernel, x.output_inputs(), outs, grid=(S // cfg.chunk_size, -(-DHHV // BV)),
                      BV=BV, **self._run(cfg, p), **output_consts(x, cfg, p))

    def input_gradients(self, x: Operands, cfg: KernelConfig, p: dict[str, int], grad_dtypes):
        BH, S, DHQK, DHHV = x.dims
        NC = S // cfg.chunk_size
        consts = gradient_consts(x, cfg, p)
        dq, dk = (jax.ShapeDtypeStruct((BH, S, DHQK), dt) for dt in grad_dtypes[:2])
        dv = jax.ShapeDtypeStruct((BH, S, DHHV), grad_dtypes[2])
        row = jax.ShapeDtypeStruct((BH, S), jnp.float32)
        dq, qdq = launch(mlstm_bw_dq_kernel, x.dq_inputs(), [dq, row], grid=(NC,), NS=x.c_in.shape[1],
                         **self._run(cfg, p, p["dq_warps"]), **consts)
        dk, dv, kdk = launch(mlstm_bw_dkdv_kernel, x.dkdv_inputs(), [dk, dv, row], grid=(NC,), **self._run(cfg, p),
                             **consts)
        return dq, dk, dv, qdq, kdk


LIMIT = LimitFamily()
