"""Experiments behind docs/RESULTS.md: the benchmark, the reproduction, the crash test, the 2D experiments."""
