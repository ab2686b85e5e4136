"""Distributed SGD variants, one module per family (THEORY.md section 5)."""
