"""splitbench: trace-driven benchmark and load-testing harness for LLM serving."""
__version__ = "0.1.0"
