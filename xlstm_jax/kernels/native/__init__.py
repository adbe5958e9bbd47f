"""The XLA implementations of the mLSTM: parallel, recurrent, chunkwise (with its hand-written backward), the
one-token step, and the chunkwise math the Triton families share (chunk_math, state_combine)."""
