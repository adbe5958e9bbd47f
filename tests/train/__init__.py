"""Training jobs: MQAR, resume, guards, data and corpora, training checkpoint integrity."""
