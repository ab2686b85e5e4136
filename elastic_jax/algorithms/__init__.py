"""Distributed SGD variants, one module per family (docs/theory.md section 5)."""
