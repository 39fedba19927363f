"""splitbench: trace-driven benchmark and load-testing harness for LLM serving. `splitbench.open_run(dir)` reads a
run's records (pandas), run.json and summary.json."""
from splitbench import native

native.activate()   # the simulator's compiled group, or its sources where that build is stale (native.py)

__version__ = "0.1.0"
__all__ = ["open_run", "Run", "__version__"]


def __getattr__(name: str):
    # Lazy: schema.run imports pandas, measured at 0.7-1.5 s on a busy 2-core host, and every splitbench process
    # (CLI, stub, router, workers) imports this package; only users of open_run pay for it.
    if name in ("open_run", "Run"):
        from splitbench.schema import run
        return getattr(run, name)
    raise AttributeError(f"module 'splitbench' has no attribute {name!r}")
