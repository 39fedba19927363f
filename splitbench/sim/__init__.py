"""The discrete-event simulator: event loop, simulated cluster, performance model and profiles."""
