"""Benchmarks: a load generator for OpenAI endpoints and side-by-side comparisons.

Numbers here are ratios measured in one run on one machine, never assertions in tests.
"""
