"""The one launch layer through which every Triton kernel of xlstm_jax is called (docs/kernels.md, "Triton launch
layer").

- CUDA: `jax_triton.triton_call` (imported lazily: it refuses to import without a CUDA jaxlib). jax-triton 0.3.1
  clobbers TRITON_CACHE_DIR on import; the previous value is restored. Works with 0.3.1 (`out_shape`) and 0.4.x
  (`out_type`); jax-triton 0.4.1's needs on triton 3.6 and its launch of warp-specialized kernels are mended in
  `jax_triton_shims`.
- CPU with XLSTM_JAX_TRITON_INTERPRET=1: the same `@triton.jit` kernels run in Triton's interpreter inside a
  `jax.pure_callback` (slow; for tests at small shapes).
- Otherwise: a RuntimeError that names the native backends.

Kernel convention: `kernel(*input_ptrs, *output_ptrs, **constexprs)`. Every input and output has the same leading
axis (the flattened batch·heads axis, "BH") and grid axis 0 runs over it, so `vmap` folds the mapped axis into BH
(one launch, no loop over the mapped axis).
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_jax.kernels.base import vary_like
from xlstm_jax.kernels.jax_triton_shims import define_tma_tf32, launch_with_compiled_warps

INTERPRET_ENV = "XLSTM_JAX_TRITON_INTERPRET"


def interpret_mode() -> bool:
    """True when Triton kernels should run in Triton's CPU interpreter."""
    return os.environ.get(INTERPRET_ENV, "0") not in ("", "0", "false", "False")



def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@functools.cache
def _cuda_problem() -> str | None:
    """Why the CUDA path cannot run here, or None."""
    if jax.default_backend() != "gpu":
        return f"no CUDA GPU (JAX backend is {jax.default_backend()!r}); set {INTERPRET_ENV}=1 for the CPU interpreter"
    from xlstm_jax.compat import version_problems

    device = jax.devices()[0]
    cc = getattr(device, "compute_capability", None)
    cc = tuple(int(x) for x in str(cc).split(".")) if cc else None
    errors = [
        msg
        for severity, msg in version_problems(
            jax_version=jax.__version__,
            triton_version=_version("triton"),
            jax_triton_version=_version("jax-triton") or _version("jax_triton"),
            compute_capability=cc,
        )
        if severity == "error"
    ]
    return "; ".join(errors) or None


def triton_availability() -> tuple[bool, str]:
    """(can Triton kernels run here, why / how)."""
    if _version("triton") is None:
        return False, "triton is not installed (pip install 'xlstm-jax[gpu]' on CUDA, or triton for the interpreter)"
    if interpret_mode():
        return True, f"Triton interpreter on the host ({INTERPRET_ENV}=1; slow, for tests)"
    problem = _cuda_problem()
    if problem:
        return False, problem
    return True, "jax-triton on CUDA"


@functools.cache
def tma_available() -> bool:
    """Whether kernels may read through TMA tensor descriptors made on the host (`launch`'s `descriptors`) here: in
    Triton's interpreter (which implements them), or on a GPU and toolchain `compat.tma_support` accepts."""
    if interpret_mode():
        return True
    if not triton_availability()[0]:
        return False
    from xlstm_jax.compat import installed_versions, tma_support

    return tma_support(installed_versions())[0]


@functools.cache
def _jax_triton():
    saved = os.environ.get("TRITON_CACHE_DIR")
    import triton.backends.nvidia.driver as nvidia_driver

    define_tma_tf32(nvidia_driver)  # before jax_triton's import, which needs it (jax_triton_shims)
    import jax_triton
    from jax_triton import triton_lib

    launch_with_compiled_warps(triton_lib)

    if saved is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = saved
    out_kw = "out_type" if "out_type" in inspect.signature(jax_triton.triton_call).parameters else "out_shape"
    return jax_triton, out_kw, _aliased_outputs_take_parameters(jax_triton)


def _aliased_outputs_take_parameters(jax_triton) -> bool:
    """Whether this jax-triton passes an aliased output to the kernel as a parameter of its own (0.3: the kernel's
    parameters are the inputs, then every output) or not (0.4: the aliased output is written through its input's
    parameter, and only the other outputs follow the inputs)."""
    version = tuple(int(part) for part in jax_triton.__version__.split(".")[:2] if part.isdigit())
    return version < (0, 4)


class _HostTensor:
    """The slice of the torch.Tensor protocol Triton's interpreter uses, over a numpy array (no torch needed)."""

    # One long-lived dtype object per name: triton 3.9 caches argument types by the dtype object's identity, so a
    # fresh object per call could reuse a freed one's address and be read as that one's dtype (seen as bf16
    # operands turning into float32 at random). Host-made tensor descriptors read itemsize and is_floating_point.
    _DTYPES = {
        name: type("dtype", (), {"__str__": lambda _, name=name: f"torch.{name}", "itemsize": size,
                                 "is_floating_point": name.startswith("float") or name == "bfloat16"})()
        for name, size in (("float64", 8), ("float32", 4), ("float16", 2), ("bfloat16", 2), ("int32", 4),
                           ("int64", 8), ("int8", 1), ("uint8", 1), ("float8_e4m3fn", 1))
    }

    def __init__(self, array: np.ndarray):
        self.array = array
        self.dtype = self._DTYPES[array.dtype.name]

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self) -> "_HostTensor":
        return self

    def cpu(self) -> "_HostTensor":
        return self

    def new_empty(self, *args, **kwargs) -> "_HostTensor":
        return self

    def set_(self, *args, **kwargs) -> "_HostTensor":
        return self

    def copy_(self, other) -> "_HostTensor":
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self) -> tuple[int, ...]:
        return self.array.shape

    def stride(self) -> tuple[int, ...]:
        return tuple(s // self.array.itemsize for s in self.array.strides)


_INTERPRETED: dict[Callable[..., Any], Any] = {}


def _interpreted(kernel: Any) -> Any:
    """The kernel as Triton's interpreter runs it, however `@triton.jit` built it: without TRITON_INTERPRET set
    when a kernel module (or triton.language) was imported, it is a compiling JITFunction. Cached by its Python
    function (a JITFunction's own hash compiles a dependency key, which fails inside the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel.fn not in _INTERPRETED:
        _INTERPRETED[kernel.fn] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[kernel.fn]


@functools.cache
def _fix_interpreter() -> None:
    """Fixes to Triton's interpreter (3.6 to 3.9) so it runs our kernels as the GPU does, whatever was imported
    first:
    - a `@triton.jit` function built as a compiling JITFunction (ours, or triton.language's own helpers such as
      tl.cdiv when triton was imported before the interpreter was asked for) refuses to be called from an
      interpreted kernel: such calls run interpreted;
    - it keeps bf16 as raw uint16 bits and feeds them to np.matmul as integers: widen bf16 dot operands to float32
      (exact) first;
    - it converts a scalar tensor to an index with int() of a 1-element 1-D array, which numpy 2 refuses: loops
      with bounds computed from program ids failed;
    - (3.9) a comparison of scalars keeps its operands' integer type, so a mask built from one (`pid == 0`) reaches
      the masked load/store as int32, which they refuse: masks are cast to bool."""
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self)(*args, **kwargs)
    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_tensor_index
    masked_load = interpreter.InterpreterBuilder.create_masked_load
    masked_store = interpreter.InterpreterBuilder.create_masked_store

    def as_bool(mask):
        return interpreter.TensorHandle(np.asarray(mask.data).astype(bool), tl.int1)

    def create_masked_load_bool(self, ptrs, mask, *args, **kwargs):
        return masked_load(self, ptrs, as_bool(mask), *args, **kwargs)

    def create_masked_store_bool(self, ptrs, value, mask, *args, **kwargs):
        return masked_store(self, ptrs, value, as_bool(mask), *args, **kwargs)

    interpreter.InterpreterBuilder.create_masked_load = create_masked_load_bool
    interpreter.InterpreterBuilder.create_masked_store = create_masked_store_bool


# Triton's interpreter keeps the running program's grid position in process-global state, and XLA's CPU runtime may
# run independent host callbacks (e.g. the dq and dk/dv kernels of one backward) on several threads at once: one
# interpreted launch at a time.
_INTERPRETER_LOCK = threading.Lock()


def _unwritten(out: jax.ShapeDtypeStruct) -> np.ndarray:
    """A host output buffer as a kernel finds it: NaN (the smallest integer), so an element a kernel fails to
    write shows up in its results, as uninitialised CUDA memory would, rather than passing as a zero."""
    dtype = np.dtype(out.dtype)
    fill = np.nan if jnp.issubdtype(dtype, jnp.floating) else np.iinfo(dtype).min
    return np.full(out.shape, fill, dtype)


def _host_descriptor(array: np.ndarray, block_shape: tuple[int, int]) -> Any:
    """Triton's host-made tensor descriptor over the (BH·S, D) rows of `array` (BH, S, D), for the interpreter."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = array.reshape(-1, array.shape[-1])
    return TensorDescriptor(_HostTensor(rows), list(rows.shape), [rows.shape[1], 1], list(block_shape))


def _interpret(kernel, grid, out_shapes, aliases, descriptors, constexprs, *inputs):
    _fix_interpreter()

    def host(*arrays):
        ins = [np.ascontiguousarray(a) for a in arrays]
        outs = [_unwritten(o) for o in out_shapes]
        for i, o in aliases:  # an aliased output starts as its input, as in the input's buffer on the GPU
            outs[o] = ins[i].copy()
        tiles = dict(descriptors)
        args = [_host_descriptor(a, tiles[i]) if i in tiles else _HostTensor(a) for i, a in enumerate(ins)]
        with _INTERPRETER_LOCK:
            _interpreted(kernel)[grid](*args, *(_HostTensor(o) for o in outs), **constexprs)
        return tuple(outs)

    return jax.pure_callback(host, tuple(out_shapes), *inputs, vmap_method="sequential")


def _launch_unbatched(kernel, grid_rest, out_shapes, num_warps, num_stages, aliases, descriptors, constexprs, *inputs):
    bh = inputs[0].shape[0]
    grid = (bh, *grid_rest)
    if interpret_mode():
        return _interpret(kernel, grid, out_shapes, aliases, descriptors, constexprs, *inputs)
    ok, why = triton_availability()
    if not ok:
        raise RuntimeError(
            f"Triton kernels cannot run here: {why}. Use backend='native_chunkwise' (or 'native_parallel', "
            "'native_recurrent') instead."
        )
    jt, out_kw, aliases_take_parameters = _jax_triton()
    tiles = dict(descriptors)
    inputs = [jt.TensorDescriptor.from_array(x.reshape(-1, x.shape[-1]), tiles[i]) if i in tiles else x
              for i, x in enumerate(inputs)]
    call = functools.partial(jt.triton_call, kernel=kernel, grid=grid, num_warps=num_warps, num_stages=num_stages)
    if aliases_take_parameters:
        return tuple(call(*inputs, input_output_aliases=dict(aliases), **{out_kw: out_shapes}, **constexprs))
    inputs, io_aliases, order = _aliased_last(bh, inputs, aliases, len(out_shapes))
    outs = call(*inputs, input_output_aliases=io_aliases, **{out_kw: tuple(out_shapes[o] for o in order)},
                **constexprs)
    return tuple(outs[order.index(o)] for o in range(len(out_shapes)))


def _aliased_last(bh: int, inputs: Sequence[jax.Array], aliases: tuple[tuple[int, int], ...], n_out: int):
    """jax-triton >= 0.4's arguments for our kernel convention (inputs, then every output, the aliased outputs
    first). There an aliased output has no parameter of its own but is written through its input's, the other
    outputs take the parameters left over, and the runtime hands the kernel its operands' buffers, then every
    output's, in parameter order. So each aliased input moves to the end of the inputs (the aliased outputs'
    parameters), a one-byte-per-row placeholder takes its place, and the aliased outputs go after the others.
    Returns (inputs, input_output_aliases, the outputs' order for jax-triton)."""
    moved = [i for i, _ in sorted(aliases, key=lambda pair: pair[1])]
    kept = [jnp.zeros((bh,), jnp.uint8) if index in moved else x for index, x in enumerate(inputs)]
    order = (*range(len(moved), n_out), *range(len(moved)))
    io_aliases = {len(kept) + j: n_out - len(moved) + j for j in range(len(moved))}
    return (*kept, *(inputs[i] for i in moved)), io_aliases, order


def launch(
    kernel: Callable[..., Any],
    inputs: Sequence[jax.Array],
    out_shapes: Sequence[jax.ShapeDtypeStruct],
    *,
    grid: tuple[int, ...],
    num_warps: int = 4,
    num_stages: int = 1,
    aliases: dict[int, int] | None = None,
    descriptors: dict[int, tuple[int, int]] | None = None,
    **constexprs: Any,
) -> tuple[jax.Array, ...]:
    """Launch `kernel` over grid (BH, *grid) where BH = inputs[0].shape[0] = every array's leading axis.

    All scalars are compile-time constants (`constexprs`). The kernel's parameters are the inputs, then every
    output. `aliases` {input index: output index}: the output takes the input's buffer and starts as the input
    (XLA copies the input first when it is still needed). The aliased outputs must be the first outputs, and the
    kernel reads an aliased array through the output's parameter only (with jax-triton >= 0.4 the input's own
    parameter receives a placeholder: `_aliased_last`). `descriptors` {input index: (rows, columns)}: the kernel
    takes that input (BH, S, D) as a TMA tensor descriptor over its (BH·S, D) rows with tiles of that shape, made
    on the host at launch (needs `tma_available()`; D·itemsize a multiple of 16 bytes). Returns the outputs
    (other outputs are uninitialised memory on CUDA: kernels write every element they own). Supports `jax.vmap`
    (mapped axes are folded into BH) and `shard_map` (outputs vary over the mesh axes the inputs vary over).
    """
    out_shapes = tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in out_shapes)
    bh = inputs[0].shape[0]
    for x in (*inputs, *out_shapes):
        if x.shape[0] != bh:
            raise ValueError(f"every kernel operand must lead with the BH axis {bh}, got shape {x.shape}.")
    aliases = tuple(sorted((aliases or {}).items()))
    if sorted(o for _, o in aliases) != list(range(len(aliases))):
        raise ValueError(f"aliased outputs must be the first outputs, got aliases {dict(aliases)}.")
    descriptors = tuple(sorted((descriptors or {}).items()))
    if descriptors and not tma_available():
        raise ValueError("descriptors: TMA tensor descriptors cannot be used here (`xlstm-jax doctor` says why); "
                         "pass none for pointer loads.")
    for index, block_shape in descriptors:
        x = inputs[index] if 0 <= index < len(inputs) else None
        if x is None or x.ndim < 2 or index in dict(aliases) or len(block_shape) != 2:
            raise ValueError(f"descriptors: input {index} must be an unaliased input of rank >= 2 with a "
                             f"(rows, columns) tile, got {block_shape} for {None if x is None else x.shape}.")
        if x.shape[-1] * x.dtype.itemsize % 16:
            raise ValueError(f"descriptors: input {index}'s rows ({x.shape[-1]} x {x.dtype}) are not a multiple of "
                             "16 bytes, which TMA needs.")
    call = functools.partial(_launch_unbatched, kernel, tuple(grid), out_shapes, num_warps, num_stages, aliases,
                             descriptors, constexprs)

    run = jax.custom_batching.custom_vmap(call)

    @run.def_vmap
    def _fold(axis_size, in_batched, *args):
        folded = []
        for x, batched in zip(args, in_batched):
            x = x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            folded.append(x.reshape(axis_size * x.shape[1], *x.shape[2:]))
        outs = launch(
            kernel, folded,
            [jax.ShapeDtypeStruct((axis_size * o.shape[0], *o.shape[1:]), o.dtype) for o in out_shapes],
            grid=grid, num_warps=num_warps, num_stages=num_stages, aliases=dict(aliases),
            descriptors=dict(descriptors), **constexprs,
        )
        return tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs), tuple(True for _ in outs)

    # under shard_map the outputs of a custom call do not carry the inputs' manual mesh axes: give them those
    return tuple(vary_like(out, *inputs) for out in run(*inputs))
