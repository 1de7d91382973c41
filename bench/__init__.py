"""Benchmarks: speed claims come from here, never from timed assertions in tests."""
