"""The Triton families' tuning knobs and head-dim limit (importable without Triton: the op's implementation table
names them)."""

from __future__ import annotations

import dataclasses

WARPS = (1, 2, 4, 8, 16)
MAX_HEAD_DIM = 1024  # the largest DHQK and DHHV the Triton chunkwise kernels take


@dataclasses.dataclass(frozen=True)
class TritonTuning:
    """Implementation knobs of the Triton families (the same math for every value).

    reduce_slicing: the output and backward kernels read the chunk-border state buffers whole (True) or with the
    last state sliced off in XLA first. recompute_states_in_bw: recompute the chunk-border states in the backward
    (True) or keep them as residuals. xl family only: inter_chunk_size (the state recurrence's granularity),
    tile_q / tile_kv (query / key rows per tile), each a power of two >= 16 dividing the chunk size, None:
    min(64, chunk_size); num_warps of every per-chunk kernel (None: the launch table's)."""

    reduce_slicing: bool = True
    recompute_states_in_bw: bool = True
    inter_chunk_size: int | None = None
    tile_q: int | None = None
    tile_kv: int | None = None
    num_warps: int | None = None

    def __post_init__(self):
        if self.num_warps is not None and self.num_warps not in WARPS:
            raise ValueError(f"num_warps must be one of {', '.join(map(str, WARPS))}, got {self.num_warps!r}.")
