"""Test configuration: fake CPU devices and strict numerics, set once before JAX starts."""

import jax

# Eight fake CPU devices for the multi-device tests; one mechanism per process.
jax.config.update("jax_num_cpu_devices", 8)
# Implicit rank promotion hides shape bugs: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
