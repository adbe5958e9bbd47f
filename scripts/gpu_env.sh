# The environment the GPU scripts run Python under (sourced by gpu_checks.sh, gpu_train_profile.sh and
# gpu_quant_check.sh): no preallocation (a torch peer or a second process may share the card), unbuffered output,
# and the allocator's limit raised to 94% of the card, since without preallocation it still stops at 75% (60 GB on
# an H100, where the 1.3B training step at B=8 peaks near 58 GB). jaxlib refuses XLA_CLIENT_MEM_FRACTION beside the
# older XLA_PYTHON_CLIENT_MEM_FRACTION (its CUDA plugin does not start and JAX runs on the CPU): a caller's setting
# of the old name stays alone.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
[ -n "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ] || export XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-0.94}
