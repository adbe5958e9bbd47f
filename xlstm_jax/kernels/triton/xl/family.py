"""The xl-chunk family's per-chunk kernels behind core.py: chunks of up to 2048 tokens tiled into (LQ, LKV)
blocks, the chunk-border states at a finer inter-chunk granularity. Kernels: kernels.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xlstm_jax.kernels.launch import launch
from xlstm_jax.kernels.native.chunk_math import nonfinite_chunks
from xlstm_jax.kernels.triton.xl.kernels import (
    mlstm_xl_bw_dk_kernel,
    mlstm_xl_bw_dq_kernel,
    mlstm_xl_bw_dv_kernel,
    mlstm_xl_fw_parallel_kernel,
)
from xlstm_jax.kernels.triton.core import (
    KernelConfig,
    Operands,
    block,
    gradient_consts,
    output_consts,
    tile_params,
)


@dataclasses.dataclass(frozen=True)
class XlFamily:
    name: str = "xl"

    def configure(self, chunk_size: int, tiles) -> dict:
        """tiles = (tile_q, tile_kv, inter_chunk_size), None: min(64, chunk_size)."""
        inter, LQ, LKV = tile_params(chunk_size, tiles[2], tiles[0], tiles[1])
        return dict(inter_chunk_size=inter, tile_q=LQ, tile_kv=LKV)

    @staticmethod
    def _run(p: dict[str, int], warps: int) -> dict[str, int]:
        return dict(num_warps=warps, num_stages=p["xl_stages"])

    @staticmethod
    def warps_fields(num_warps: int) -> dict[str, int]:
        return dict(xl_warps=num_warps, xl_bw_warps=num_warps)

    def outputs(self, x: Operands, cfg: KernelConfig, p: dict[str, int], out_dtype):
        """The careful body of the kernel runs in the chunks whose end state is not finite (chunk_math.nonfinite_chunks),
        the plain one elsewhere."""
        BH, S, DHQK, DHHV = x.dims
        BV = block(DHHV, p["xl_out_block"])
        outs = [jax.ShapeDtypeStruct((BH, S, DHHV), out_dtype), jax.ShapeDtypeStruct((BH, S), jnp.float32),
                jax.ShapeDtypeStruct((BH, S), jnp.float32)]
        NC = S // cfg.chunk_size
        return launch(mlstm_xl_fw_parallel_kernel, [*x.output_inputs(), nonfinite_chunks(x.c_all, x.n_all)], outs,
                      grid=(NC * (cfg.chunk_size // cfg.tile_q), -(-DHHV // BV)), BV=BV, LQ=cfg.tile_q,
                      LKV=cfg.tile_kv, **self._run(p, p["xl_warps"]), **output_consts(x, cfg, p))

    def input_gradients(self, x: Operands, cfg: KernelConfig, p: dict[str, int], grad_dtypes):
        """Each output column block rebuilds its score tiles over the full other head dim: wide blocks recompute
        less."""
        BH, S, DHQK, DHHV = x.dims
        L = cfg.chunk_size
        NC = S // L
        consts = gradient_consts(x, cfg, p)
        run = dict(LQ=cfg.tile_q, LKV=cfg.tile_kv, **self._run(p, p["xl_bw_warps"]))
        dq_shape, dk_shape = (jax.ShapeDtypeStruct((BH, S, DHQK), dt) for dt in grad_dtypes[:2])
        dv_shape = jax.ShapeDtypeStruct((BH, S, DHHV), grad_dtypes[2])
        b_dq, b_dk, b_dv = block(DHQK, p["xl_dq_block"]), block(DHQK, p["xl_dk_block"]), block(DHHV, p["xl_dv_block"])
        n_dq, n_dk = -(-DHQK // b_dq), -(-DHQK // b_dk)
        dq_rows, dk_rows = (jax.ShapeDtypeStruct((BH, n, S), jnp.float32) for n in (n_dq, n_dk))
        dq, qdq = launch(mlstm_xl_bw_dq_kernel, x.dq_inputs(), [dq_shape, dq_rows],
                         grid=(NC * (L // cfg.tile_q), n_dq), NS=x.c_in.shape[1], **run, **{**consts, "BK": b_dq})
        dk, kdk = launch(mlstm_xl_bw_dk_kernel, x.dkdv_inputs(), [dk_shape, dk_rows],
                         grid=(NC * (L // cfg.tile_kv), n_dk), BO=b_dk, **run, **consts)
        (dv,) = launch(mlstm_xl_bw_dv_kernel, x.dkdv_inputs(), [dv_shape],
                       grid=(NC * (L // cfg.tile_kv), -(-DHHV // b_dv)), BO=b_dv, **run, **consts)
        return dq, dk, dv, qdq.sum(axis=1), kdk.sum(axis=1)


XL = XlFamily()
