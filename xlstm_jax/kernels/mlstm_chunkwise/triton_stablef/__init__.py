"""The documented limit-chunk module: triton_fwbw.py."""
