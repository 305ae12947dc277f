"""Benchmark harness of fastdensity (installed as ``fastdensity.benchmarks``)."""
