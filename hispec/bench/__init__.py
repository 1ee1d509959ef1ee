"""Benchmarks (not timed tests): runtime micro-benchmarks now; the method benchmark later."""
