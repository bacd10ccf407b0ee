"""Benchmarks behind `fedrec bench` (DP step, simulation, serving)."""
