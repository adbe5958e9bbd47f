"""Matmuls of a few rows against a large weight (decoding's projections): reference and split-K Triton kernel."""
