"""The xl-chunk (TFLA) family: chunks of 16..2048 tokens tiled into (LQ, LKV) blocks."""
