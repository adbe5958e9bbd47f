"""Several processes (hosts) in one run, on `jax.distributed`: the same command on every host.

`initialize(coordinator, num_processes, process_id)` starts JAX's distributed runtime before any other JAX call:
with the three flags from them, otherwise from a cluster environment that JAX detects (SLURM, Open MPI, …), and
not at all on a single host. On CPUs, cross-process collectives go through gloo.
"""

from __future__ import annotations

import os

_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def check_flags(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """ValueError (naming the flag as its field) unless the flags are all given or all left out, and consistent."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if missing and len(missing) < 3:
        raise ValueError(f"{missing[0]}: --coordinator, --num-processes and --process-id go together; "
                         f"{', '.join('--' + m.replace('_', '-') for m in missing)} missing.")
    if missing:
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator: must be HOST:PORT (e.g. 10.0.0.1:1234), got {coordinator!r}.")
    if num_processes < 1:
        raise ValueError(f"num_processes: must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: must be in [0, {num_processes}), got {process_id}.")


def in_cluster() -> bool:
    """Whether the environment describes a job of several processes (SLURM, Open MPI, PMI)."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _CLUSTER_SIZE_VARIABLES)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start the distributed runtime (flags, or the cluster environment); returns whether it was started."""
    check_flags(coordinator, num_processes, process_id)
    if coordinator is None and not in_cluster():
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU backend's; GPUs use NCCL
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True
