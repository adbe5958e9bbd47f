"""Chunkwise mLSTM implementations: native XLA, Triton limit-chunk ("stablef" family) and Triton xl-chunk."""
