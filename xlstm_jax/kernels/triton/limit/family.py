"""The limit-chunk family's per-chunk kernels behind core.py: one L x L tile per chunk in registers, chunk
sizes 16..128. Forward: fw_kernels.mlstm_fw_parallel_kernel; backward: bw_kernels' dq and fused dk/dv kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.launch import launch
from xlstm_jax.kernels.triton.core import (KernelConfig, Operands, block, gradient_consts, output_consts,
                                          token_descriptors)
from xlstm_jax.kernels.triton.launch_table import LaunchParams, param
from xlstm_jax.kernels.triton.limit.bw_kernels import (mlstm_bw_dkdv_kernel, mlstm_bw_dq_kernel,
                                                       mlstm_bw_gradients_kernel)
from xlstm_jax.kernels.triton.limit.fw_kernels import mlstm_fw_chunk_loop_kernel, mlstm_fw_parallel_kernel


@dataclasses.dataclass(frozen=True)
class LimitLaunch(LaunchParams):
    """Launch of the limit per-chunk kernels, the table's "limit" section: the head-dim tile of the reductions
    (block) and of the output's DHHV columns (out_v_block); warps at L <= 64 and at L = 128, pipelining stages, the
    warps of the dq kernel; whether the q, k, v and dh tiles are read through TMA tensor descriptors (tma; where the
    GPU, toolchain and row strides allow: core.token_descriptors), whether one kernel forms dq, dk and dv (fused_bw;
    with dq_warps warps) where two did, and how many consecutive chunks one forward output program walks in a
    software-pipelined loop (chunks_per_program; 1: one program a chunk). Keep dq_warps at 8: with 4, triton 3.6 on
    H100 miscompiles that kernel for bf16 at L=64, DHQK=128, DHHV=256 (dq 80% off, silently; caught by
    test_gpu_parity_realistic_shape, and the tuner and the stage sweeps reject any candidate whose results
    deviate)."""

    block: int = param("tile")
    out_v_block: int = param("tile")
    warps: int = param("warps")
    warps_l128: int = param("warps")
    stages: int = param("stages")
    dq_warps: int = param("warps")
    tma: int = param("flag")
    fused_bw: int = param("flag")
    chunks_per_program: int = param("count")


@dataclasses.dataclass(frozen=True)
class LimitFamily:
    name: str = "limit"
    launch_type: type = LimitLaunch

    def configure(self, chunk_size: int, tiles) -> dict:
        if any(t is not None for t in tiles):
            raise ValueError(f"the limit family takes no tiles (tile_q, tile_kv, inter_chunk_size), got {tiles}.")
        return {}

    @staticmethod
    def _run(cfg: KernelConfig, p: LimitLaunch, num_warps: int | None = None) -> dict[str, int]:
        if num_warps is None:
            num_warps = p.warps if cfg.chunk_size <= 64 else p.warps_l128
        return dict(num_warps=num_warps, num_stages=p.stages)

    @staticmethod
    def warps_fields(num_warps: int) -> dict[str, int]:
        return {f"limit.{name}": num_warps for name in ("warps", "warps_l128", "dq_warps")}

    def outputs(self, x: Operands, cfg: KernelConfig, p: LimitLaunch, out_dtype):
        BH, S, DHQK, DHHV = x.dims
        BV = block(DHHV, p.out_v_block)
        outs = [jax.ShapeDtypeStruct((BH, S, DHHV), out_dtype), jax.ShapeDtypeStruct((BH, S), jnp.float32),
                jax.ShapeDtypeStruct((BH, S), jnp.float32)]
        consts = output_consts(x, cfg, p)
        consts.update(descriptors=token_descriptors(p.tma, cfg.chunk_size, (x.q, x.k, x.v),
                                                    (consts["BK"], consts["BK"], BV)))
        NC, columns = S // cfg.chunk_size, -(-DHHV // BV)
        if p.chunks_per_program > 1:
            chunks = min(p.chunks_per_program, NC)
            return launch(mlstm_fw_chunk_loop_kernel, x.output_inputs(), outs, grid=(-(-NC // chunks), columns), BV=BV,
                          TMA=bool(consts["descriptors"]), CHUNKS=chunks, STAGES=p.stages, **self._run(cfg, p),
                          **consts)
        return launch(mlstm_fw_parallel_kernel, x.output_inputs(), outs, grid=(NC, columns), BV=BV,
                      TMA=bool(consts["descriptors"]), **self._run(cfg, p), **consts)

    def input_gradients(self, x: Operands, cfg: KernelConfig, p: LimitLaunch, grad_dtypes):
        BH, S, DHQK, DHHV = x.dims
        NC = S // cfg.chunk_size
        consts = gradient_consts(x, cfg, p)
        rows = token_descriptors(p.tma, cfg.chunk_size, (x.q, x.k, x.v, x.dh), (consts["BK"], consts["BK"],
                                                                               consts["BV"], consts["BV"]))
        consts.update(descriptors=rows, TMA=bool(rows))
        dq, dk = (jax.ShapeDtypeStruct((BH, S, DHQK), dt) for dt in grad_dtypes[:2])
        dv = jax.ShapeDtypeStruct((BH, S, DHHV), grad_dtypes[2])
        row = jax.ShapeDtypeStruct((BH, S), jnp.float32)
        if p.fused_bw:
            dq, dk, dv, qdq, kdk = launch(mlstm_bw_gradients_kernel, x.gradient_inputs(), [dq, dk, dv, row, row],
                                          grid=(NC,), NS=x.c_in.shape[1], **self._run(cfg, p, p.dq_warps), **consts)
            return dq, dk, dv, qdq, kdk
        dq, qdq = launch(mlstm_bw_dq_kernel, x.dq_inputs(), [dq, row], grid=(NC,), NS=x.c_in.shape[1],
                         **self._run(cfg, p, p.dq_warps), **consts)
        dk, dv, kdk = launch(mlstm_bw_dkdv_kernel, x.dkdv_inputs(), [dk, dv, row], grid=(NC,), **self._run(cfg, p),
                             **consts)
        return dq, dk, dv, qdq, kdk


LIMIT = LimitFamily()
