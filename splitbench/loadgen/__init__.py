"""Load generation: traces and workloads, prompt synthesis, the open-loop replayer."""
