"""Hardware: the machine catalog, allocation of machine shares, the NVML power sampler."""
