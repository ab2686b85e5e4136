"""The algorithm registry: how the launcher's flags become an `ej.Algorithm`.

Each entry of `ALGORITHMS` is a builder `build(flags, parts) -> ej.Algorithm` and
the set of algorithm-specific flags it reads. `parts` holds what the factories
share, built once from the flags: the learning rate (a number or an optax
schedule of the round), the compressor, error feedback and clipping. Adding an
algorithm is adding an entry; the families not yet exported by `elastic_jax`
are registered as soon as it exports their factory. Builders only call the
library's factories, which validate their arguments and compile nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optax

import elastic_jax as ej


class Parts(NamedTuple):
    """What every algorithm factory shares, built from the flags."""

    learning_rate: Any  # a number, or an optax schedule of the round
    compressor: Any  # an ej compressor, or None
    error_feedback: Any  # False, True (beta = 1) or a float beta
    clip_norm: float | None


# Algorithm-specific flags that have an "off" value: an algorithm that does not read
# one of them requires it off (a compressor given to local SGD is an error); the
# other algorithm-specific flags (max_delay, delay, reads, k_fraction, ...) are
# ignored by the algorithms that do not read them.
OFF_VALUES = {
    "compressor": "none", "error_feedback": False, "clip_norm": 0.0,
    "drop_prob": 0.0, "crashes": 0, "crash_horizon": 0,
}
_UPDATE_RULE = frozenset({"compressor", "k_fraction", "qsgd_levels", "error_feedback",
                          "ef_beta", "clip_norm"})


class AlgorithmEntry(NamedTuple):
    """A registry entry: `build(flags, parts) -> ej.Algorithm` and the flags it reads."""

    build: Callable[[Mapping[str, Any], Parts], ej.Algorithm]
    uses: frozenset


def _sync(f: Mapping[str, Any], parts: Parts) -> ej.Algorithm:
    return ej.sync_sgd(
        parts.learning_rate, f["num_workers"], compressor=parts.compressor,
        error_feedback=parts.error_feedback, clip_norm=parts.clip_norm,
    )


def _async(f: Mapping[str, Any], parts: Parts) -> ej.Algorithm:
    return ej.async_sgd(
        parts.learning_rate, f["num_workers"], f["max_delay"], delay=f["delay"],
        reads=f["reads"], compressor=parts.compressor,
        error_feedback=parts.error_feedback, clip_norm=parts.clip_norm,
    )


def _message_passing(f: Mapping[str, Any], parts: Parts) -> ej.Algorithm:
    return ej.message_passing_sgd(
        parts.learning_rate, f["num_workers"], max_delay=f["max_delay"], delay=f["delay"],
        drop_prob=f["drop_prob"], retransmit=f["retransmit"],
        crashes=f["crashes"] or None, crash_horizon=f["crash_horizon"] or None,
        compressor=parts.compressor, error_feedback=parts.error_feedback,
        clip_norm=parts.clip_norm,
    )


def _elastic_scheduling(f: Mapping[str, Any], parts: Parts) -> ej.Algorithm:
    return ej.elastic_scheduling(
        parts.learning_rate, f["num_workers"], f["max_outstanding"], delay=f["delay"],
        mode=f["mode"], clip_norm=parts.clip_norm,
    )


def _local_sgd(f: Mapping[str, Any], parts: Parts) -> ej.Algorithm:
    return ej.local_sgd(parts.learning_rate, f["num_workers"], f["period"],
                        clip_norm=parts.clip_norm)


# name -> entry; the families that have not landed in the library yet are
# registered as soon as `elastic_jax` exports their factory.
ALGORITHMS: dict[str, AlgorithmEntry] = {
    "sync": AlgorithmEntry(_sync, _UPDATE_RULE),
    "async": AlgorithmEntry(_async, _UPDATE_RULE | {"max_delay", "delay", "reads"}),
}
if hasattr(ej, "message_passing_sgd"):
    ALGORITHMS["message_passing"] = AlgorithmEntry(
        _message_passing,
        _UPDATE_RULE | {"max_delay", "delay", "drop_prob", "retransmit", "crashes",
                        "crash_horizon"},
    )
if hasattr(ej, "elastic_scheduling"):
    ALGORITHMS["elastic_scheduling"] = AlgorithmEntry(
        _elastic_scheduling, frozenset({"max_outstanding", "delay", "mode", "clip_norm"})
    )
if hasattr(ej, "local_sgd"):
    ALGORITHMS["local_sgd"] = AlgorithmEntry(_local_sgd, frozenset({"period", "clip_norm"}))

COMPRESSORS = ("none", "identity", "top_k", "random_k", "scaled_random_k", "qsgd",
               "scaled_sign")
SCHEDULES = ("constant", "cosine", "linear", "exponential")

def make_schedule(f: Mapping[str, Any]) -> Callable:
    """The learning rate: a number, or an optax schedule of the round (see `--schedule`)."""
    eta, kind = f["learning_rate"], f["schedule"]
    if kind == "constant":
        return eta  # a number, so that the factory checks it too
    horizon = f["schedule_rounds"] or f["rounds"]
    final = eta * f["final_lr_fraction"]
    if kind == "cosine":
        return optax.cosine_decay_schedule(eta, horizon, alpha=f["final_lr_fraction"])
    if kind == "linear":
        return optax.linear_schedule(eta, final, horizon)
    return optax.exponential_decay(eta, horizon, f["final_lr_fraction"], end_value=final)


def make_compressor(f: Mapping[str, Any]):
    """The compressor `--compressor` names, or None."""
    name = f["compressor"]
    if name == "none":
        return None
    if name == "identity":
        return ej.identity()
    if name == "top_k":
        return ej.top_k(fraction=f["k_fraction"])
    if name in ("random_k", "scaled_random_k"):
        return ej.random_k(fraction=f["k_fraction"], scaled=name == "scaled_random_k")
    if name == "qsgd":
        return ej.qsgd(f["qsgd_levels"])
    return ej.scaled_sign()
