"""Benchmarks and load tools (run with `make bench`; never part of `make test`)."""
