"""Native (XLA) chunkwise mLSTM with a hand-written backward: forward in `fw`, backward in `bw`, custom_vjp wiring
and the public function in `api`."""

from xlstm_jax.kernels.mlstm_chunkwise.native.api import mlstm_chunkwise_native

__all__ = ["mlstm_chunkwise_native"]
