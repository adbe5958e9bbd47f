"""`xlstm-jax bench`: runtime, peak memory and roofline fractions of every mLSTM backend, side by side with peers.

Modules: `cases` (presets and cases), `cost` (FLOP/byte model of docs/benchmarks.md and device peaks), `measure`
(in-process timing), `worker` (one case in an isolated subprocess), `peers` (cuDNN attention, mlstm_kernels),
`torch_peer` (PyTorch peers), `report` (table, CSV, JSON, plots) and `runner` (the sweep and its CLI options).
"""

from xlstm_jax.bench.cases import PRESETS
from xlstm_jax.bench.runner import run_bench

__all__ = ["PRESETS", "run_bench"]
