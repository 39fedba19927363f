"""The application layer: the only place that wires workloads, backends, the client and metrics together."""
