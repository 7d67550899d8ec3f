"""Worked examples; a package so that benchmarks and tests can import their simulators."""
