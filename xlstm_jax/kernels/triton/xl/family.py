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
from xlstm_jax.kernels.triton.launch_table import LaunchParams, param


@dataclasses.dataclass(frozen=True)
class XlLaunch(LaunchParams):
    """Launch of the xl per-chunk kernels, the table's "xl" section: the head-dim tile of the reductions (block),
    warps and pipelining stages of every kernel, the forward's output (DHHV) tile, and the warps and output column
    tiles of the dq, dk and dv kernels. Each column block rebuilds its score tiles over the whole other head dim, so
    a wider block recomputes less and holds more registers."""

    block: int = param("tile")
    warps: int = param("warps")
    stages: int = param("stages")
    out_block: int = param("tile")
    bw_warps: int = param("warps")
    dq_block: int = param("tile")
    dk_block: int = param("tile")
    dv_block: int = param("tile")


@dataclasses.dataclass(frozen=True)
class XlFamily:
    name: str = "xl"
    launch_type: type = XlLaunch

    def configure(self, chunk_size: int, tiles) -> dict:
        """tiles = (tile_q, tile_kv, inter_chunk_size), None: min(64, chunk_size)."""
        inter, LQ, LKV = tile_params(chunk_size, tiles[2], tiles[0], tiles[1])
        return dict(inter_chunk_size=inter, tile_q=LQ, tile_kv=LKV)

    @staticmethod
    def _run(p: XlLaunch, num_warps: int) -> dict[str, int]:
        return dict(num_warps=num_warps, num_stages=p.stages)

    @staticmethod
    def warps_fields(num_warps: int) -> dict[str, int]:
        return {"xl.warps": num_warps, "xl.bw_warps": num_warps}

    def outputs(self, x: Operands, cfg: KernelConfig, p: XlLaunch, out_dtype):
        """The careful body of the kernel runs in the chunks whose end state is not finite (chunk_math.nonfinite_chunks),
        the plain one elsewhere."""
        BH, S, DHQK, DHHV = x.dims
        BV = block(DHHV, p.out_block)
        outs = [jax.ShapeDtypeStruct((BH, S, DHHV), out_dtype), jax.ShapeDtypeStruct((BH, S), jnp.float32),
                jax.ShapeDtypeStruct((BH, S), jnp.float32)]
        NC = S // cfg.chunk_size
        return launch(mlstm_xl_fw_parallel_kernel, [*x.output_inputs(), nonfinite_chunks(x.c_all, x.n_all)], outs,
                      grid=(NC * (cfg.chunk_size // cfg.tile_q), -(-DHHV // BV)), BV=BV, LQ=cfg.tile_q,
                      LKV=cfg.tile_kv, **self._run(p, p.warps), **output_consts(x, cfg, p))

    def input_gradients(self, x: Operands, cfg: KernelConfig, p: XlLaunch, grad_dtypes):
        """Each output column block rebuilds its score tiles over the full other head dim: wide blocks recompute
        less."""
        BH, S, DHQK, DHHV = x.dims
        L = cfg.chunk_size
        NC = S // L
        consts = gradient_consts(x, cfg, p)
        run = dict(LQ=cfg.tile_q, LKV=cfg.tile_kv, **self._run(p, p.bw_warps))
        dq_shape, dk_shape = (jax.ShapeDtypeStruct((BH, S, DHQK), dt) for dt in grad_dtypes[:2])
        dv_shape = jax.ShapeDtypeStruct((BH, S, DHHV), grad_dtypes[2])
        b_dq, b_dk, b_dv = block(DHQK, p.dq_block), block(DHQK, p.dk_block), block(DHHV, p.dv_block)
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
