"""Known-bad version combinations of jax, triton and jax-triton, the versions installed here, and JAX GPU memory
settings that defeat themselves (`environment_problems`).

`version_problems` is a pure function of version strings: the Triton launch layer calls it before the first
CUDA launch and `xlstm-jax doctor` prints its findings. Severity "error" means the Triton kernels must not run
with that combination; "warning" means they run, with a caveat. A package given as None (not installed) is not
checked. Sources: jax-triton's per-tag requirements and its issue tracker.
"""

from __future__ import annotations

import platform
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Mapping

try:
    from packaging.version import InvalidVersion, Version
except ImportError:  # packaging is optional: fall back to comparing release numbers
    Version = None
    InvalidVersion = ValueError

TRITON_MINIMUM = "3.6"
TRITON_HOPPER_TRANS_FIXED = "3.7.1"


def _release(text: str) -> tuple[int, ...]:
    """Leading numeric components of a version string: "3.7.0rc1+git1" -> (3, 7, 0). Tolerates junk after them."""
    parts = []
    for piece in text.strip().lstrip("vV").split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    if not parts:
        raise ValueError(f"cannot read a version number from {text!r}.")
    return tuple(parts)


def _key(text: str) -> Any:
    """A comparable key: packaging's Version when it parses (pre-releases sort before the release), else the
    release tuple padded to length 4."""
    if Version is not None:
        try:
            return Version(text)
        except InvalidVersion:
            pass
    return (*_release(text), 0, 0, 0, 0)[:4]


def version_at_least(installed: str, minimum: str) -> bool:
    """installed >= minimum, e.g. version_at_least("3.6.0", "3.6") is True; "3.7.1rc1" is below "3.7.1"."""
    a, b = _key(installed), _key(minimum)
    if type(a) is not type(b):  # one side unparseable by packaging: compare release numbers only
        a, b = ((*_release(x), 0, 0, 0, 0)[:4] for x in (installed, minimum))
    return a >= b


def _minor(text: str) -> tuple[int, int]:
    release = _release(text)
    return release[0], release[1] if len(release) > 1 else 0


def version_problems(
    *,
    jax_version: str,
    triton_version: str | None,
    jax_triton_version: str | None,
    compute_capability: tuple[int, int] | None,
) -> list[tuple[str, str]]:
    """(severity, message) for every known problem of this combination; severity is "error" or "warning".

    compute_capability is the CUDA (major, minor) of the GPU, or None without one.
    """
    problems: list[tuple[str, str]] = []

    def error(message: str) -> None:
        problems.append(("error", message))

    if triton_version is not None and not version_at_least(triton_version, TRITON_MINIMUM):
        error(f"triton {triton_version} is too old: the kernels need triton >= {TRITON_MINIMUM}.")

    if jax_triton_version is not None:
        jt = _minor(jax_triton_version)
        supported = "use jax-triton 0.3.1 (triton 3.6, jax >= 0.8.2) or 0.4.x (triton >= 3.6, jax >= 0.11)"
        if jt < (0, 3):
            error(f"jax-triton {jax_triton_version} is not supported; {supported}.")
        elif jt == (0, 3) and not version_at_least(jax_triton_version, "0.3.1"):
            if triton_version is not None and _minor(triton_version) == (3, 5):
                error(
                    f"jax-triton {jax_triton_version} fails with triton {triton_version} "
                    f"(make_ttir arguments, jax-triton#365); {supported}."
                )
            else:
                problems.append(("warning", f"jax-triton {jax_triton_version} is untested here; {supported}."))
        elif jt == (0, 3):
            if triton_version is not None and not version_at_least(triton_version, "3.6"):
                error(f"jax-triton {jax_triton_version} needs triton >= 3.6, found triton {triton_version}.")
            if not version_at_least(jax_version, "0.8.2"):
                error(f"jax-triton {jax_triton_version} needs jax >= 0.8.2, found jax {jax_version}.")
        else:
            # With triton 3.6, jax-triton 0.4 imports a name triton 3.6 lacks (TMA_TF32; without it the NVIDIA backend
            # is a stub: '_Stub' object has no attribute 'backend'): xlstm_jax.kernels.launch defines it first.
            if triton_version is not None and not version_at_least(triton_version, "3.6"):
                error(f"jax-triton {jax_triton_version} needs triton >= 3.6, found triton {triton_version}.")
            if not version_at_least(jax_version, "0.11"):
                error(f"jax-triton {jax_triton_version} needs jax >= 0.11, found jax {jax_version}.")
            if jt >= (0, 5):
                problems.append(("warning", f"jax-triton {jax_triton_version} is newer than the tested 0.4.x."))

    if (
        compute_capability is not None
        and compute_capability[0] == 9
        and triton_version is not None
        and version_at_least(triton_version, "3.4")
        and not version_at_least(triton_version, TRITON_HOPPER_TRANS_FIXED)
    ):
        problems.append((
            "warning",
            f"triton {triton_version} on Hopper (sm_{compute_capability[0]}{compute_capability[1]}) has a known "
            "tl.trans miscompile on wgmma accumulators (fla#640, fixed in triton 3.7.1); the xlstm_jax kernels avoid "
            "that pattern and are parity-tested on H100.",
        ))
    return problems


MEM_FRACTION, OLD_MEM_FRACTION = "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"


def environment_problems(environ: Mapping[str, str], cuda_plugin: bool) -> list[tuple[str, str]]:
    """(severity, message) for JAX's GPU memory settings in `environ` (an os.environ-like mapping); cuda_plugin:
    whether jax's CUDA plugin is installed (without it the settings do nothing)."""
    if not cuda_plugin:
        return []
    problems = []
    if MEM_FRACTION in environ and OLD_MEM_FRACTION in environ:
        problems.append(("error", f"{MEM_FRACTION} and the older {OLD_MEM_FRACTION} are both set: jaxlib's CUDA "
                                  f"plugin then refuses to start (seen with jaxlib 0.11.2) and JAX runs on the CPU. "
                                  f"Unset {OLD_MEM_FRACTION}."))
    preallocate = environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").strip().lower()
    if preallocate in ("false", "0") and MEM_FRACTION not in environ and OLD_MEM_FRACTION not in environ:
        problems.append(("warning", f"XLA_PYTHON_CLIENT_PREALLOCATE={preallocate} without {MEM_FRACTION}: JAX's "
                                    f"allocator still stops at 75% of the GPU's memory (60 GB on an 80 GB card); set "
                                    f"{MEM_FRACTION} (e.g. 0.94) where a model needs more."))
    return problems


def cuda_plugin_installed() -> bool:
    """Whether a CUDA plugin of jax (jax-cuda12-plugin, jax-cuda13-plugin) is installed (package metadata; nothing
    is imported)."""
    return _distribution_version("jax-cuda12-plugin", "jax-cuda13-plugin") is not None


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def parse_compute_capability(value: Any) -> tuple[int, int] | None:
    """A device's compute_capability ("9.0", 9.0 or (9, 0)) as (major, minor); None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    release = _release(str(value))
    return release[0], release[1] if len(release) > 1 else 0


def _jaxlib_encodes_tma_descriptors() -> bool:
    """Whether the installed jaxlib's Triton kernel calls take TMA descriptors made on the host at launch (its
    `create_tma_descriptor_parameter`, which jax-triton >= 0.4's `TensorDescriptor` needs; jaxlib 0.11.2's CUDA
    plugin has it)."""
    try:
        from jax._src.lib import gpu_triton
    except ImportError:
        return False
    return hasattr(gpu_triton, "create_tma_descriptor_parameter")


def installed_versions() -> dict[str, Any]:
    """python, jax, jaxlib, triton, jax_triton (None when missing), JAX platform, GPU name and compute capability,
    and whether jaxlib encodes host-made TMA descriptors (jaxlib_tma_descriptors).

    jax-triton is read from package metadata and never imported (it refuses to import without a CUDA jaxlib).
    """
    import jax

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _distribution_version("jaxlib"),
        "triton": _distribution_version("triton"),
        "jax_triton": _distribution_version("jax-triton", "jax_triton"),
        "platform": device.platform,
        "gpu": getattr(device, "device_kind", None) if on_gpu else None,
        "compute_capability": parse_compute_capability(getattr(device, "compute_capability", None)) if on_gpu else None,
        "jaxlib_tma_descriptors": _jaxlib_encodes_tma_descriptors(),
    }


def tma_support(versions: dict[str, Any]) -> tuple[bool, str]:
    """(available, why) for TMA tensor descriptors launched from JAX (made on the host at launch: launch.py's
    `descriptors`): a Hopper or newer GPU (compute capability >= 9.0), jax-triton >= 0.4 (its `TensorDescriptor`),
    jax >= 0.11, triton >= 3.6 and a jaxlib that encodes them. `versions` is shaped like `installed_versions()`."""
    cc, jt, triton = versions["compute_capability"], versions["jax_triton"], versions["triton"]
    missing = []
    if cc is None or cc < (9, 0):
        missing.append("a GPU of compute capability >= 9.0 (Hopper)" + ("" if cc is None else f", found {cc[0]}.{cc[1]}"))
    if jt is None or _minor(jt) < (0, 4):
        missing.append("jax-triton >= 0.4" + ("" if jt is None else f", found {jt}"))
    if not version_at_least(versions["jax"], "0.11"):
        missing.append(f"jax >= 0.11, found {versions['jax']}")
    if triton is None or not version_at_least(triton, "3.6"):
        missing.append("triton >= 3.6" + ("" if triton is None else f", found {triton}"))
    if not versions["jaxlib_tma_descriptors"]:
        missing.append("a jaxlib whose Triton calls take host-made descriptors (create_tma_descriptor_parameter, "
                       "as 0.11.2's CUDA plugin)")
    if missing:
        return False, "needs " + "; ".join(missing)
    return True, f"jax-triton {jt} with triton {triton} on compute capability {cc[0]}.{cc[1]}"


def installed_problems(versions: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """`version_problems` for the installed versions (or a dict shaped like `installed_versions()`)."""
    versions = installed_versions() if versions is None else versions
    return version_problems(
        jax_version=versions["jax"],
        triton_version=versions["triton"],
        jax_triton_version=versions["jax_triton"],
        compute_capability=versions["compute_capability"],
    )
