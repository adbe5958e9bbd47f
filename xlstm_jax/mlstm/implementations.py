"""The implementations of the op as data: what each accepts and how it runs checked inputs.

`Implementation.run(x, o, chunk_size, tuning)` takes `MLSTMInputs` (gates (B, NH, S)), the semantic
`MLSTMOptions`, a chunk size checked by `chunk_size_for` (None for the unchunked forms) and the implementation's own
tuning object (None: its defaults); it returns h (B, NH, S, DHHV) in q's dtype, or (h, (C, n, m)). Adding an
implementation is one entry in IMPLEMENTATIONS (docs/design.md, "Adding a backend").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax

from xlstm_jax.kernels.base import MLSTMInputs, MLSTMOptions, MLSTMShape, check_chunk_size
from xlstm_jax.kernels.launch import triton_availability
from xlstm_jax.kernels.native.chunkwise import chunkwise_native
from xlstm_jax.kernels.native.parallel import mlstm_parallel
from xlstm_jax.kernels.native.recurrent import RecurrentTuning, mlstm_recurrent
from xlstm_jax.kernels.triton import families
from xlstm_jax.kernels.triton.tuning import MAX_HEAD_DIM, TritonTuning

Run = Callable[[MLSTMInputs, MLSTMOptions, "int | None", Any], Any]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One implementation of the op. chunk_sizes: (min, max) power-of-two chunk sizes, None: no chunking;
    context_parallel: can split a sequence over devices (context_parallel.py); denominators: takes the seed
    configs' denominator variants (MLSTMOptions.norm_val / stabilize_correctly); tuning: the class of its knobs."""

    name: str
    run: Run
    description: str
    needs_triton: bool = False
    chunk_sizes: tuple[int, int] | None = None
    default_chunk_size: int | None = None
    context_parallel: bool = False
    denominators: bool = False
    tuning: type | None = None

    def chunk_size_for(self, requested: int | None) -> int | None:
        """The chunk size a call runs with: the default for None, `requested` checked against `chunk_sizes`."""
        if self.chunk_sizes is None:
            if requested is not None:
                raise ValueError(f"backend {self.name!r} does not take a chunk_size, got chunk_size={requested}.")
            return None
        if requested is None:
            return self.default_chunk_size
        return check_chunk_size(requested, minimum=self.chunk_sizes[0], maximum=self.chunk_sizes[1])

    def supports(self, shape: MLSTMShape | None = None, platform: str | None = None) -> tuple[bool, str]:
        """(whether it runs inputs of `shape` on `platform` (None: the default backend), why not)."""
        if self.needs_triton:
            ok, why = triton_availability()
            if not ok:
                return False, why
            platform = platform or jax.default_backend()
            if platform not in ("gpu", "cpu"):
                return False, f"the Triton kernels run on CUDA GPUs (and in Triton's interpreter on CPU), not {platform}"
            if shape is not None and max(shape.DHQK, shape.DHHV) > MAX_HEAD_DIM:
                return False, f"head dims must be <= {MAX_HEAD_DIM}, got DHQK={shape.DHQK} DHHV={shape.DHHV}"
        return True, ""

    def check(self, o: MLSTMOptions, tuning: Any) -> None:
        """ValueError/TypeError when the options or tuning are not this implementation's."""
        if not (self.denominators or o.standard_denominator):
            able = [n for n, impl in IMPLEMENTATIONS.items() if impl.denominators]
            raise ValueError(f"backend {self.name!r} runs the standard denominator only (norm_val 1.0, "
                             f"stabilize_correctly True), got {o.norm_val} and {o.stabilize_correctly}; use one of "
                             f"{able}.")
        if tuning is not None and (self.tuning is None or not isinstance(tuning, self.tuning)):
            wanted = "no tuning" if self.tuning is None else f"a {self.tuning.__name__}"
            raise TypeError(f"backend {self.name!r} takes {wanted}, got {type(tuning).__name__}.")


def _untuned(run: Callable[[MLSTMInputs, MLSTMOptions, int | None], Any]) -> Run:
    return lambda x, o, chunk_size, tuning: run(x, o, chunk_size)


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl for impl in (
        Implementation("native_parallel", _untuned(mlstm_parallel),
                       "quadratic parallel form in XLA (O(S^2) memory), autodiff"),
        Implementation("native_recurrent", mlstm_recurrent,
                       "step-by-step recurrence under lax.scan in XLA, autodiff", tuning=RecurrentTuning),
        Implementation("native_chunkwise", _untuned(chunkwise_native),
                       "chunkwise form in XLA with a hand-written backward, O(S) memory", chunk_sizes=(16, 512),
                       default_chunk_size=64, context_parallel=True),
        Implementation("triton_limit_chunk", functools.partial(families.run, "limit"),
                       "Triton limit-chunk kernels (one L x L tile per chunk), fused backward", needs_triton=True,
                       chunk_sizes=(16, 128), default_chunk_size=64, context_parallel=True, denominators=True,
                       tuning=TritonTuning),
        Implementation("triton_xl_chunk", functools.partial(families.run, "xl"),
                       "Triton TFLA xl-chunk kernels (tiled chunks of any size), exact backward", needs_triton=True,
                       chunk_sizes=(16, 2048), default_chunk_size=64, context_parallel=True, denominators=True,
                       tuning=TritonTuning),
    )
}
