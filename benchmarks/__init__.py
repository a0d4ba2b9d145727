"""Benchmarks (not run in CI). Each script prints the exact figures recorded in docs/BENCHMARKS.md."""
