"""Data that every layer shares: the per-request record schema, run metadata and atomic files."""
