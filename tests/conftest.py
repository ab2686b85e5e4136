"""Test configuration: fake CPU devices and strict numerics, set once before JAX starts."""

import os

# On a loaded 2-core machine the eight fake devices' collectives can wait long
# for each other; XLA:CPU would abort a rendezvous after its default timeout.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_cpu_collective_call_terminate_timeout_seconds=900",
    "--xla_cpu_collective_timeout_seconds=900",
]).strip()

import jax  # noqa: E402

# Eight fake CPU devices for the multi-device tests; one mechanism per process.
jax.config.update("jax_num_cpu_devices", 8)
# Implicit rank promotion hides shape bugs: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
