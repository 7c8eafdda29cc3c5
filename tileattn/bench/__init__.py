"""Benchmark suites behind ``tileattn bench``: ``kernels`` (GPU prefill throughput and memory against
SDPA's backends and naive attention) and ``demo`` (the CPU check of error and peak memory)."""
