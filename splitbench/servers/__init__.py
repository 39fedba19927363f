"""The processes splitbench runs: the stub server, the P/D router, the vLLM launcher, the tiny model."""
