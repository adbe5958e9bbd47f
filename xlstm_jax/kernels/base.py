"""The contract every mLSTM implementation shares: the one signature (`MLSTMInputs`, `MLSTMOptions`), input
checks, dtype rules, gate math and neutral padding.

Shapes (README.md, "Usage"; docs/math.md): q, k (B, NH, S, DHQK); v (B, NH, S, DHHV); i, f (B, NH, S) or (B, NH, S, 1);
c_initial (B, NH, DHQK, DHHV), n_initial (B, NH, DHQK), m_initial (B, NH). States are float32, m in natural-log
units. Every check runs on static shapes and dtypes, so it fires before anything is traced or launched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Neutral padding (docs/precision.md): a padded step must leave C, n and m exactly unchanged. An input-gate
# pre-activation of -1e30 makes exp(i - m) exactly 0 for any reachable m; a forget pre-activation of +1e30 gives
# log(sigmoid(f)) == 0 exactly in float32, i.e. no decay.
NEUTRAL_IGATE = -1e30
NEUTRAL_FGATE = 1e30
# The longest sequence the fused prefill kernel (triton/prefill.py) runs: its programs hold every gate in registers.
MAX_PREFILL = 512
# Log forget gates are floored here: exp(-2^100 + x) is exactly 0 for every |x| < 2^99, so a gate at the floor is the
# same full reset as log(sigmoid(-inf)) = -inf, but sums and differences of log gates stay finite (no -inf - -inf).
# The floor is a power of two so that a sum of k floors (k adjacent document starts) is exact in float32 for k < 2^24:
# with -1e30, three floors summed rounded by 1.5e23, which the two-float cumulative sums of the Triton kernels then
# carried in their low part, where the small log gates after the starts vanished (issue 31).
LOG_FORGET_FLOOR = -(2.0**100)
# Log forget gates below this are full resets (e^{-2^20} is 0 in every float) and are set to the floor: a sum of
# large log gates that is not exact (f = -1e30 three times) would leave a rounding error in the two-float low part
# too large for the small gates that follow to register.
LOG_FORGET_RESET = -(2.0**20)

_COMPUTE_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class MLSTMShape:
    """Static problem size of one mLSTM call."""

    B: int
    NH: int
    S: int
    DHQK: int
    DHHV: int


class MLSTMInputs(NamedTuple):
    """The arrays of one call, checked by `checked_inputs`: q, k (B, NH, S, DHQK), v (B, NH, S, DHHV) sharing one
    dtype; gates i, f (B, NH, S); initial states C (B, NH, DHQK, DHHV), n (B, NH, DHQK), m (B, NH), all or none."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    i: jax.Array
    f: jax.Array
    c_initial: jax.Array | None = None
    n_initial: jax.Array | None = None
    m_initial: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class MLSTMOptions:
    """The semantic options every implementation takes besides the arrays (its chunk_size and tuning are its own):
    return_last_states; eps (checked, > 0); autocast_dtype, the matmul operand dtype (None: q's dtype); max_state
    False: every log gate is <= 0 and the initial states are true ones (mLSTMsig, mlstm/input_gates.py), so an
    implementation may hold the stabilizer m at 0 instead of carrying a running max (the results are the same);
    norm_val / stabilize_correctly: the seed configs' denominator max(|q̂·ñ|, norm_val·e^{-m}) (True, the standard
    one at norm_val 1) or max(|q̂·ñ|, norm_val) (False); `standard_denominator` says whether it is the standard."""

    return_last_states: bool = False
    eps: float = 1e-6
    autocast_dtype: Any = None
    max_state: bool = True
    norm_val: float = 1.0
    stabilize_correctly: bool = True

    @property
    def standard_denominator(self) -> bool:
        return self.norm_val == 1.0 and self.stabilize_correctly

    def result(self, h: jax.Array, states: tuple[jax.Array, jax.Array, jax.Array]):
        """h, or (h, (C, n, m)) with `return_last_states`."""
        return (h, tuple(states)) if self.return_last_states else h


def _shape_str(x: Any) -> str:
    return str(tuple(np.shape(x)))


def check_float_array(x: Any, name: str) -> None:
    """x must be an array (jax or numpy, not a list) of a floating dtype: TypeError naming `name` otherwise."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be an array (jax.Array or numpy.ndarray), got {type(x).__name__}.")
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16), got {dtype}.")


def _gate_to_3d(x: Any, name: str, expected: tuple[int, int, int]) -> jax.Array:
    shape = tuple(np.shape(x))
    if shape == expected:
        return jnp.asarray(x)
    if shape == (*expected, 1):
        return jnp.asarray(x)[..., 0]
    raise ValueError(f"{name} must have shape (B, NH, S) = {expected} or (B, NH, S, 1), got shape {shape}.")


def check_inputs(
    q: Any,
    k: Any,
    v: Any,
    i: Any,
    f: Any,
    c_initial: Any = None,
    n_initial: Any = None,
    m_initial: Any = None,
) -> tuple[jax.Array, jax.Array, MLSTMShape]:
    """Validate mLSTM inputs and return the gates as (B, NH, S) arrays and the problem size.

    Raises ValueError for shapes (naming the argument, its shape and what was expected) and TypeError for dtypes.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float_array(x, name)
        if np.ndim(x) != 4:
            axes = "(B, NH, S, DHHV)" if name == "v" else "(B, NH, S, DHQK)"
            raise ValueError(f"{name} must be 4-D {axes}, got shape {_shape_str(x)}.")
    B, NH, S, DHQK = np.shape(q)
    DHHV = np.shape(v)[-1]
    if np.shape(k) != (B, NH, S, DHQK):
        raise ValueError(f"k must have the shape of q {(B, NH, S, DHQK)}, got shape {_shape_str(k)}.")
    if np.shape(v)[:3] != (B, NH, S):
        raise ValueError(f"v must have shape (B, NH, S, DHHV) with (B, NH, S) = {(B, NH, S)}, got {_shape_str(v)}.")
    if min(B, NH, S, DHQK, DHHV) < 1:
        raise ValueError(f"all of B, NH, S, DHQK, DHHV must be >= 1, got q {_shape_str(q)} and v {_shape_str(v)}.")
    dtypes = {jnp.result_type(x) for x in (q, k, v)}
    if len(dtypes) != 1:
        raise TypeError(
            "q, k and v must share one dtype, got "
            f"q {jnp.result_type(q)}, k {jnp.result_type(k)}, v {jnp.result_type(v)}."
        )
    for name, x in (("i", i), ("f", f)):
        check_float_array(x, name)
    i3 = _gate_to_3d(i, "i", (B, NH, S))
    f3 = _gate_to_3d(f, "f", (B, NH, S))

    given = [x is not None for x in (c_initial, n_initial, m_initial)]
    if any(given) and not all(given):
        missing = [n for n, g in zip(("c_initial", "n_initial", "m_initial"), given) if not g]
        raise ValueError(f"initial states must be given all three or none; missing {', '.join(missing)}.")
    if all(given):
        for name, x, expected in (
            ("c_initial", c_initial, (B, NH, DHQK, DHHV)),
            ("n_initial", n_initial, (B, NH, DHQK)),
            ("m_initial", m_initial, (B, NH)),
        ):
            check_float_array(x, name)
            if tuple(np.shape(x)) != expected:
                raise ValueError(f"{name} must have shape {expected}, got shape {_shape_str(x)}.")
    return i3, f3, MLSTMShape(B, NH, S, DHQK, DHHV)


def checked_inputs(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None) -> tuple[MLSTMInputs, MLSTMShape]:
    """`check_inputs`, then the arrays as JAX sees them (numpy float64 is float32 while 64-bit JAX is off)."""
    i3, f3, shape = check_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    arrays = (None if x is None else jnp.asarray(x) for x in (q, k, v, i3, f3, c_initial, n_initial, m_initial))
    return MLSTMInputs(*arrays), shape


def validated(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, *, return_last_states: Any = False,
              eps: Any = 1e-6, autocast_dtype: Any = None, dtype_name: str = "autocast_dtype", norm_val: Any = 1.0,
              stabilize_correctly: Any = True) -> tuple[MLSTMInputs, MLSTMOptions]:
    """The one check of every public entry: the five inputs and the states (`checked_inputs`), eps, the compute
    dtype (`dtype_name` names the caller's argument) and the denominator variant, as (MLSTMInputs, MLSTMOptions);
    the input gate's max_state is set where the call is dispatched."""
    x, _ = checked_inputs(q, k, v, i, f, c_initial, n_initial, m_initial)
    resolve_compute_dtype(autocast_dtype, x.q.dtype, dtype_name)  # a float64 q under 64-bit JAX is refused here
    options = MLSTMOptions(bool(return_last_states), check_eps(eps), autocast_dtype, True,
                           check_positive(norm_val, "norm_val"), bool(stabilize_correctly))
    return x, options


def check_chunk_size(chunk_size: Any, *, minimum: int = 16, maximum: int | None = None) -> int:
    """A chunk size must be an int, a power of two and within [minimum, maximum]."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise ValueError(f"chunk_size must be an int, got {chunk_size!r}.")
    chunk_size = int(chunk_size)
    if chunk_size < minimum or chunk_size & (chunk_size - 1):
        bound = f"{minimum}..{maximum}" if maximum else f">= {minimum}"
        raise ValueError(f"chunk_size must be a power of two in {bound}, got {chunk_size}.")
    if maximum is not None and chunk_size > maximum:
        raise ValueError(f"chunk_size must be a power of two in {minimum}..{maximum}, got {chunk_size}.")
    return chunk_size


def check_positive(value: Any, name: str) -> float:
    """A positive finite number (TypeError for a non-number, ValueError otherwise, naming `name`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a positive finite float, got {type(value).__name__} {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}.")
    return float(value)


def check_eps(eps: Any) -> float:
    """The denominator epsilon: a positive finite number."""
    return check_positive(eps, "eps")


def floating_dtype(dtype: Any, name: str) -> jnp.dtype:
    """`dtype` (a floating dtype or its name) as a jnp dtype; TypeError naming `name` otherwise."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{name} must be a floating dtype or its name, got {dtype!r}.") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype, got {dtype}.")
    return dtype


def resolve_compute_dtype(dtype: Any, default: Any, name: str = "autocast_dtype") -> jnp.dtype:
    """Matmul operand dtype: "float32" | "bfloat16" | "float16" or the jnp types; None -> `default`, q's dtype as JAX
    sees it (float64 arrays are float32 while 64-bit JAX is off). float64 q under 64-bit JAX is refused."""
    if dtype is None:
        default = jax.dtypes.canonicalize_dtype(default)
        if default.name not in _COMPUTE_DTYPES:
            raise TypeError(
                f"q has dtype {default}, which the mLSTM kernels do not compute in: pass q, k and v as float32, "
                f"bfloat16 or float16 (e.g. q.astype(jnp.float32)), or set {name}='float32'. The float64 "
                "recurrence is xlstm_jax.mlstm.reference.mlstm_recurrent_reference."
            )
        return jnp.dtype(default)
    key = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if key not in _COMPUTE_DTYPES:
        raise ValueError(f"{name} must be one of {sorted(_COMPUTE_DTYPES)} (or None), got {dtype!r}.")
    return jnp.dtype(_COMPUTE_DTYPES[key])


def matmul_precision(dtype: Any) -> jax.lax.Precision:
    """XLA precision of a matmul with `dtype` operands: HIGHEST for float32 and wider, so GPUs do not round the
    operands to TF32; DEFAULT (the native 16-bit product) otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else jax.lax.Precision.DEFAULT


# float16 matmul operands that are computed, not given (scores, states, cotangents), are first divided by a power
# of two that brings their largest finite magnitude to at most this, so the cast cannot overflow.
FP16_OPERAND_MAX = 2.0**14


def fit_float16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x / s, s): s is the power of two >= 1 (a float32 scalar) with max finite |x| / s <= FP16_OPERAND_MAX.
    Non-finite entries do not set the scale, so they poison only the products they take part in."""
    magnitude = jnp.abs(x.astype(jnp.float32))
    amax = jnp.max(jnp.where(jnp.isfinite(magnitude), magnitude, 0.0))
    scale = jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(amax / FP16_OPERAND_MAX, 1.0))))
    return x / scale.astype(x.dtype), scale


def einsum_in(spec: str, a: jax.Array, b: jax.Array, dt: Any, precision: Any = None) -> jax.Array:
    """einsum with both operands cast to the compute dtype `dt`, accumulated and returned in float32 or wider
    (`precision` None: `matmul_precision(dt)`). For float16 each operand is scaled into its range first
    (`fit_float16`) and the product scaled back."""
    dt = jnp.dtype(dt)
    kw = dict(preferred_element_type=jnp.promote_types(dt, jnp.float32),
              precision=matmul_precision(dt) if precision is None else precision)
    if dt != jnp.float16:
        return jnp.einsum(spec, a.astype(dt), b.astype(dt), **kw)
    (a, sa), (b, sb) = fit_float16(a), fit_float16(b)
    return jnp.einsum(spec, a.astype(dt), b.astype(dt), **kw) * (sa * sb)


def exp_neg(m: jax.Array) -> jax.Array:
    """e^{-m}, the lower bound of the mLSTM denominator, capped one e-fold below the largest finite value of m's
    dtype. For such m every output is ~0 either way; the cap keeps autodiff from forming inf * 0 = NaN."""
    cap = float(np.log(jnp.finfo(m.dtype).max)) - 1.0
    return jnp.exp(jnp.minimum(-m, cap))


def qk_scale(dhqk: int) -> float:
    """The query scale of every mLSTM implementation: DHQK ** -0.5."""
    return float(dhqk) ** -0.5


def log_sigmoid(x: jax.Array) -> jax.Array:
    """Numerically stable log(sigmoid(x)) = -softplus(-x), finite for every finite x."""
    return -jax.nn.softplus(-x)


def log_forget_floor(dtype: Any) -> float:
    """The floor of `log_forget` for gates of `dtype`: LOG_FORGET_FLOOR, or for dtypes of smaller range the power of
    two at or below a quarter of the largest finite value (sums of floors stay exact)."""
    quarter = float(jnp.finfo(dtype).max) / 4
    return max(LOG_FORGET_FLOOR, -(2.0 ** math.floor(math.log2(quarter))))


def log_forget(f: jax.Array) -> jax.Array:
    """The log forget gate of every backend: log(sigmoid(f)), with every value below LOG_FORGET_RESET (a full reset)
    set to the floor `log_forget_floor`, so f = -inf is the full reset it means and never a -inf that meets another
    -inf or a 0 in later sums and products, and sums of resets are exact. The floor's derivative is 0."""
    floor = log_forget_floor(f.dtype)
    logf = log_sigmoid(f)
    return jnp.where(logf < max(LOG_FORGET_RESET, floor), floor, logf)  # NaN stays NaN


def vary_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """x, varying over every manual mesh axis any of `refs` varies over (inside `shard_map`): states built from
    constants must have the type of the states a scan makes from the inputs. Adds a zero; outside shard_map a
    no-op."""
    for ref in refs:
        x = x + jnp.zeros_like(ref, shape=(), dtype=x.dtype)
    return x


def zero_nonfinite_rows(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(v with every row (last axis) that holds a NaN or inf set to zero, bad (...) True for those rows).

    A weighted sum over value rows would carry 0 * NaN = NaN into outputs whose weight for the row is exactly 0, the
    earlier positions among them; callers sum over the zeroed rows and `poison_from` the positions that do see it.
    """
    bad = ~jnp.all(jnp.isfinite(v), axis=-1)
    return jnp.where(bad[..., None], jnp.zeros_like(v), v), bad


def poison_from(h: jax.Array, bad: jax.Array) -> jax.Array:
    """h (..., S, DHHV) set to NaN at every position from the first one where `bad` (..., S) is True."""
    return jnp.where((jnp.cumsum(bad, axis=-1) > 0)[..., None], jnp.asarray(jnp.nan, h.dtype), h)


def initial_states_or_zeros(
    c_initial: jax.Array | None,
    n_initial: jax.Array | None,
    m_initial: jax.Array | None,
    shape: MLSTMShape,
    like: tuple[jax.Array, ...] = (),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The float32 initial states (C, n, m); zeros (m_0 = 0) when none are given. Under `shard_map` they vary over
    the mesh axes of the inputs `like` (q, k, v, i, f), so a scan may carry them."""
    if c_initial is None:
        states = (
            jnp.zeros((shape.B, shape.NH, shape.DHQK, shape.DHHV), jnp.float32),
            jnp.zeros((shape.B, shape.NH, shape.DHQK), jnp.float32),
            jnp.zeros((shape.B, shape.NH), jnp.float32),
        )
    else:
        states = tuple(jnp.asarray(x).astype(jnp.float32) for x in (c_initial, n_initial, m_initial))
    return tuple(vary_like(x, *like) for x in states)


def at_zero_stabilizer(c: jax.Array, n: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The same states (C̃, ñ, m) with the stabilizer at 0: (C̃ e^m, ñ e^m, 0), for any leading axes of m."""
    scale = jnp.exp(m)
    return c * scale[..., None, None], n * scale[..., None], jnp.zeros_like(m)


def pad_to_multiple(
    q: jax.Array, k: jax.Array, v: jax.Array, i: jax.Array, f: jax.Array, multiple: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Pad the sequence axis (2) to a multiple of `multiple` with neutral steps (zeros for q/k/v).

    Gates are expected as float32 (B, NH, S); the padded steps leave C, n and m exactly unchanged.
    """
    S = q.shape[2]
    pad = -S % multiple
    if pad == 0:
        return q, k, v, i, f
    seq = ((0, 0), (0, 0), (0, pad), (0, 0))
    return (
        jnp.pad(q, seq),
        jnp.pad(k, seq),
        jnp.pad(v, seq),
        jnp.pad(i, seq[:3], constant_values=NEUTRAL_IGATE),
        jnp.pad(f, seq[:3], constant_values=NEUTRAL_FGATE),
    )
