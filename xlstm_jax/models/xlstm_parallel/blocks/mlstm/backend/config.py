"""The mLSTM backend layer: base class, name registry and factory (README.md, "Seed modules").

A backend is a small callable object holding a config dataclass. Every backend takes
`(q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False)` with q, k
(B, NH, S, DHQK), v (B, NH, S, DHHV) and gates (B, NH, S) or (B, NH, S, 1) — or, for backends that can be vmapped
over heads, per-head (B, S, D) tensors and (B, S, 1) gates.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar


class mLSTMBackend(abc.ABC):
    """Base of every mLSTM backend: holds `config`, an instance of the class attribute `config_class`."""

    config_class: ClassVar[type]

    def __init__(self, config: Any = None):
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} expects a {self.config_class.__name__} config, got {type(config).__name__}."
            )
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @abc.abstractmethod
    def __call__(self, q, k, v, i, f, c_initial=None, n_initial=None, m_initial=None, return_last_states=False):
        """Run the mLSTM cell on a whole sequence: h, or (h, (C, n, m)) with `return_last_states` (module docstring
        for the shapes)."""

    @property
    @abc.abstractmethod
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend can be vmapped over the heads dimension."""

    def _through_op(self, implementation: str, q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states,
                    *, chunk_size=None, tuning=None, autocast_dtype=None, norm_val=1.0, stabilize_correctly=True):
        """The call as `xlstm_jax.mlstm` describes it (the config's eps and, where it has them, the mesh fields),
        through the op's one door (`xlstm_jax.mlstm.dispatch`)."""
        from xlstm_jax.kernels.base import validated
        from xlstm_jax.mlstm.api import MLSTMCall, dispatch

        cfg = self.config
        x, options = validated(q, k, v, i, f, c_initial, n_initial, m_initial, return_last_states=return_last_states,
                               eps=cfg.eps, autocast_dtype=autocast_dtype, norm_val=norm_val,
                               stabilize_correctly=stabilize_correctly)
        return dispatch(MLSTMCall(
            x, options, implementation, chunk_size, tuning, sequence_axis_name=getattr(cfg, "sequence_axis_name", None),
            sequence_combine=getattr(cfg, "sequence_combine", "auto"), mesh_axes=cfg.mesh_axes,
        ))


class ContextLengthFromModel:
    """Config mixin of the backends bounded by a `context_length` field: `assign_model_config_params` takes the
    model config's `context_length` when it has one."""

    def assign_model_config_params(self, model_config: Any) -> None:
        """Take `context_length` from the model config when it has one."""
        self.context_length = getattr(model_config, "context_length", self.context_length)


@dataclasses.dataclass
class mLSTMBackendNameAndKwargs:
    """A backend name from the registry plus the keyword arguments of its config (or a built config)."""

    name: str = "parallel_stabilized"
    kwargs: dict[str, Any] | Any = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, type[mLSTMBackend]] = {}


def register_backend(name: str):
    """Class decorator that adds a backend to the registry under `name`."""

    def decorate(cls: type[mLSTMBackend]) -> type[mLSTMBackend]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"mLSTM backend name {name!r} is already registered to {_REGISTRY[name].__name__}.")
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_backends() -> dict[str, type[mLSTMBackend]]:
    """Name -> backend class for every registered backend."""
    import xlstm_jax.models.xlstm_parallel.blocks.mlstm.backend  # noqa: F401  (registers the built-in backends)

    return dict(_REGISTRY)


def build_backend_config(config_class: type, kwargs: dict[str, Any]) -> Any:
    """Build `config_class(**kwargs)`, refusing keys the config does not have."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"unknown {config_class.__name__} field(s) {unknown}; valid fields are {sorted(fields)}."
        )
    return config_class(**kwargs)


def create_mlstm_backend(backend: str | mLSTMBackendNameAndKwargs, model_config: Any = None, **kwargs: Any):
    """Build a backend from a registry name and config keywords (or a `mLSTMBackendNameAndKwargs`).

    `model_config` (any object, e.g. the cell config) is passed to the config's `assign_model_config_params`
    when the config is built here from keywords; an already built config is used as it is.
    """
    if isinstance(backend, mLSTMBackendNameAndKwargs):
        if kwargs:
            raise ValueError(
                "pass config keywords either in mLSTMBackendNameAndKwargs.kwargs or as **kwargs, not both.")
        name, kwargs = backend.name, backend.kwargs
    else:
        name = backend
    registry = registered_backends()
    if name not in registry:
        raise ValueError(f"unknown mLSTM backend {name!r}; registered backends are {sorted(registry)}.")
    cls = registry[name]
    if isinstance(kwargs, cls.config_class):
        return cls(kwargs)
    config = build_backend_config(cls.config_class, dict(kwargs))
    if model_config is not None:
        config.assign_model_config_params(model_config)
    return cls(config)
