"""The Triton implementations: the differentiable chunkwise core (core.py), its families (limit/, xl/; by name
in families.py), the shared tile arithmetic and state-recurrence kernels, and the fused one-token step."""
