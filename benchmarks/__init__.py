"""Throughput benchmarks (python -m benchmarks.NAME)."""
