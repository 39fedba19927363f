"""Rendering of summaries, comparisons and gate decisions (console, Markdown, HTML, JUnit): never computes."""
