"""The documented xl-chunk module: _parallel_fw.py (the parallel forward kernel as a standalone function)."""
