"""Workloads: the trace catalogue, parsing, synthetic arrivals, transforms and exact-length prompts."""
