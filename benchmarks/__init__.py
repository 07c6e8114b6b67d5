"""Benchmarks: each module prints a table of medians; ``python -m benchmarks.run_all`` runs them all."""
