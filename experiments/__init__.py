"""Experiments for elastic_jax: data, models and launchers (they import only `elastic_jax`)."""
