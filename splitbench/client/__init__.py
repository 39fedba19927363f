"""The load generator: transports, the open-loop replayer, record sinks and sender processes."""
