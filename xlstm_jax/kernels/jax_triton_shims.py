"""What jax-triton 0.4.1 needs to run this package's kernels on the GPU machine's toolchain (triton 3.6, jaxlib
0.11.2), applied once by the launch layer before its first CUDA launch (`launch._jax_triton`). Each shim acts only
where the installed versions need it, so triton >= 3.7 (what pip gives users) and a fixed jax-triton pass through
unchanged.

- `define_tma_tf32`: jax-triton 0.4 imports `TMA_TF32` from triton's NVIDIA driver, which triton 3.6 does not
  define; without it the NVIDIA backend loads as a stub and every launch fails with "'_Stub' object has no
  attribute 'backend'". 11 is the value triton 3.7 gives it.
- `launch_with_compiled_warps`: jax-triton 0.4.1 sizes each launch's thread block from the `num_warps` the caller
  asked for, but warp specialization (`tl.range(..., warp_specialize=True)`, Gluon's `warp_specialize`) adds warps
  at compile time: the module's "ttg.total-num-warps", which triton copies into its own launch metadata. Launched
  with the requested count, such a kernel fails (CUDA_ERROR_INVALID_VALUE with 4 warps on an H100). The shim makes
  jax-triton launch with the compiled count. Upstream, the fix is two lines in `triton_lib`: return
  `metadata["num_warps"]` from `compile_ttir_to_ptx_inplace` in its `CompilationResult` and pass it to
  `TritonKernel` in place of `backend_options["num_warps"]` (docs/kernels.md, "Warp specialization").
"""

from __future__ import annotations

import re
import threading
from typing import Any

_TOTAL_WARPS = re.compile(r'"ttg\.total-num-warps"\s*=\s*(\d+)')


def define_tma_tf32(nvidia_driver: Any) -> None:
    """Give triton's NVIDIA driver module the `TMA_TF32` jax-triton 0.4 imports, where it lacks it."""
    if not hasattr(nvidia_driver, "TMA_TF32"):
        nvidia_driver.TMA_TF32 = 11


def compiled_warps(ttgir: str) -> int | None:
    """The warp count a compiled module launches with where warp specialization changed it (its
    "ttg.total-num-warps" attribute), else None."""
    match = _TOTAL_WARPS.search(ttgir)
    return None if match is None else int(match[1])


class _KernelCalls:
    """jax-triton's kernel-call library, whose `TritonKernel(name, num_warps, ...)` takes the warp count of the
    module compiled just before it on this thread (jax-triton builds the kernel right after compiling it)."""

    def __init__(self, library: Any, last: threading.local):
        self._library, self._last = library, last

    def __getattr__(self, name: str) -> Any:
        return getattr(self._library, name)

    def TritonKernel(self, name: str, num_warps: int, *rest: Any) -> Any:  # noqa: N802 (the library's name)
        warps, self._last.warps = getattr(self._last, "warps", None), None
        return self._library.TritonKernel(name, warps or num_warps, *rest)


def launch_with_compiled_warps(triton_lib: Any) -> None:
    """Make jax-triton's `triton_lib` launch every kernel with its compiled warp count (see the module docstring).
    A jax-triton without the two names it wraps (0.3) is left alone; applying it twice changes nothing."""
    if isinstance(getattr(triton_lib, "triton_kernel_call_lib", None), _KernelCalls):
        return
    if not hasattr(triton_lib, "compile_ttir_to_ptx_inplace") or not hasattr(triton_lib, "triton_kernel_call_lib"):
        return
    compile_module, last = triton_lib.compile_ttir_to_ptx_inplace, threading.local()

    def compile_and_record(*args: Any, **kwargs: Any) -> Any:
        result = compile_module(*args, **kwargs)
        last.warps = compiled_warps(getattr(result, "ttgir", "") or "")
        return result

    triton_lib.compile_ttir_to_ptx_inplace = compile_and_record
    triton_lib.triton_kernel_call_lib = _KernelCalls(triton_lib.triton_kernel_call_lib, last)
