"""Speed and memory benchmarks of elastic_jax (ratios measured in one process; see README.md)."""
