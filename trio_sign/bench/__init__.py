"""Benchmarks behind ``scripts/bench``. Not part of the public API."""
