"""elastic_jax: distributed SGD under elastic consistency, in JAX.

A functional reference implementation of Nadiradze, Markov, Chatterjee,
Kungurtsev and Alistarh, "Elastic Consistency" (arXiv:2001.05918, AAAI 2021).
Every distributed SGD variant is an `Algorithm` of pure functions; the caller
evaluates gradients at the algorithm's `views` and hands them to `update`.
"""

from elastic_jax import analysis, bounds, checks, delays, parallel
from elastic_jax.algorithms.asynchronous import async_sgd
from elastic_jax.algorithms.elastic_scheduling import elastic_scheduling
from elastic_jax.algorithms.local import local_sgd
from elastic_jax.algorithms.message_passing import message_passing_sgd
from elastic_jax.algorithms.sync import sync_sgd
from elastic_jax.compressors import (
    CompressionInfo,
    Compressor,
    compression_info,
    identity,
    qsgd,
    random_k,
    scaled_sign,
    top_k,
)
from elastic_jax.core import (
    WORKER_AXIS,
    Algorithm,
    AlgorithmInfo,
    State,
    derive_key,
    make_step,
    model,
    params,
    run,
)
from elastic_jax.error_feedback import error_feedback

__version__ = "0.1.0"

__all__ = [
    "WORKER_AXIS",
    "Algorithm",
    "AlgorithmInfo",
    "CompressionInfo",
    "Compressor",
    "State",
    "analysis",
    "async_sgd",
    "bounds",
    "checks",
    "compression_info",
    "delays",
    "elastic_scheduling",
    "derive_key",
    "error_feedback",
    "identity",
    "local_sgd",
    "make_step",
    "message_passing_sgd",
    "model",
    "parallel",
    "params",
    "qsgd",
    "random_k",
    "run",
    "scaled_sign",
    "sync_sgd",
    "top_k",
]
