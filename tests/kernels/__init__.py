"""The kernels themselves: native chunkwise / parallel / recurrent, the Triton limit and xl chunk kernels, the launch
table, sequence groups and the version compatibility table."""
