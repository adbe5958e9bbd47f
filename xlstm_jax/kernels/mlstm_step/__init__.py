"""One mLSTM time step: native.py (XLA) and triton_step.py (a fused Triton kernel)."""
