"""Data every layer shares: per-request records (records.py), run.json (runmeta.py), summary.json (summary.py), the
Run reader behind splitbench.open_run (run.py), atomic files (files.py) and the JSON type checks (typed.py)."""
