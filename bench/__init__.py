"""Benchmarks for zclip_dist. Run everything with ``python -m bench`` (see bench/RESULTS.md)."""
