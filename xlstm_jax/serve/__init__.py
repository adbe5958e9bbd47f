"""`xlstm-jax serve`: an OpenAI-compatible HTTP server (`app`, `cli`) over a continuous-batching engine
(`engine`: a fixed pool of recurrent state slots, one decode step for all of them, chunked prefill, prefix
reuse). docs/serving.md describes it."""
