"""Tiny random-weight reward models of the real architectures, built offline for tests (one module per family)."""
