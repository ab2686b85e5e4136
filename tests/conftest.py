"""Test configuration: fake CPU devices and strict numerics, set once before JAX starts."""

import atexit
import os
import shutil
import tempfile

# One compilation cache for the session, its subprocesses included (the launcher's
# kill-and-resume runs compile the same programs again and again): a program that
# took over 0.3 s to compile is read back, not compiled, the next time.
_CACHE = tempfile.mkdtemp(prefix="elastic_jax_tests_xla_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"

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
