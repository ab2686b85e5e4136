"""elastic_jax: distributed SGD under elastic consistency, in JAX.

A functional reference implementation of Nadiradze, Markov, Chatterjee,
Kungurtsev and Alistarh, "Elastic Consistency" (arXiv:2001.05918, AAAI 2021).
Every distributed SGD variant is an `Algorithm` of pure functions; each worker
turns its gradient into an update by a chain of links (`ej.chain`); the caller
evaluates gradients at `ej.views(alg, state)` and hands them to
`ej.update(alg, state, grads)`, or lets `ej.run` do it for a loss.
"""

from elastic_jax import analysis, bounds, checks, clock, delays, parallel, topologies, workers
from elastic_jax.algorithms.asynchronous import async_sgd
from elastic_jax.algorithms.clock_async import clock_async_sgd
from elastic_jax.algorithms.diloco import diloco
from elastic_jax.algorithms.elastic_scheduling import elastic_scheduling
from elastic_jax.algorithms.gossip import gossip_sgd
from elastic_jax.algorithms.local import local_sgd
from elastic_jax.algorithms.message_passing import message_passing_sgd
from elastic_jax.algorithms.sync import sync_sgd
from elastic_jax.base import (
    WORKER_AXIS,
    Algorithm,
    AlgorithmInfo,
    State,
    derive_key,
    model,
    params,
)
from elastic_jax.chain import Rule, chain
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
from elastic_jax.drivers import make_step, run
from elastic_jax.ef21 import ef21
from elastic_jax.error_feedback import error_feedback
from elastic_jax.links import Link, clip
from elastic_jax.optimizers import adamw, from_optax, sgd, weight_decay
from elastic_jax.powersgd import powersgd
from elastic_jax.rounds import update, views
from elastic_jax.sweeps import Sweep, sweep

__version__ = "0.1.0"

__all__ = [
    "WORKER_AXIS",
    "Algorithm",
    "AlgorithmInfo",
    "CompressionInfo",
    "Compressor",
    "Link",
    "Rule",
    "State",
    "Sweep",
    "adamw",
    "analysis",
    "async_sgd",
    "bounds",
    "chain",
    "checks",
    "clip",
    "clock",
    "clock_async_sgd",
    "compression_info",
    "delays",
    "derive_key",
    "diloco",
    "ef21",
    "elastic_scheduling",
    "error_feedback",
    "from_optax",
    "gossip_sgd",
    "identity",
    "local_sgd",
    "make_step",
    "message_passing_sgd",
    "model",
    "parallel",
    "params",
    "powersgd",
    "qsgd",
    "random_k",
    "run",
    "scaled_sign",
    "sgd",
    "sweep",
    "sync_sgd",
    "top_k",
    "topologies",
    "update",
    "views",
    "weight_decay",
    "workers",
]
