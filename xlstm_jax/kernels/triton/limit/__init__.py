"""The limit-chunk family: one L x L tile per chunk in registers, chunk sizes 16..128."""
