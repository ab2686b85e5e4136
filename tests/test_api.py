"""The public surface: what `import elastic_jax as ej` offers, and nothing else."""

import elastic_jax as ej

PUBLIC = {
    "WORKER_AXIS", "Algorithm", "AlgorithmInfo", "CompressionInfo", "Compressor", "Link",
    "Rule", "State", "adamw", "analysis", "async_sgd", "bounds", "chain", "checks", "clip",
    "clock", "clock_async_sgd",
    "compression_info", "delays", "derive_key", "diloco",
    "ef21", "elastic_scheduling", "error_feedback",
    "from_optax", "gossip_sgd", "identity", "local_sgd", "make_step", "message_passing_sgd",
    "model", "parallel", "params", "powersgd",
    "qsgd", "random_k", "run", "scaled_sign", "sgd", "Sweep",
    "sweep", "sync_sgd", "top_k", "topologies", "update", "views", "weight_decay", "workers",
}


def test_public_surface():
    assert set(ej.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(ej, name) is not None
    # The function, not the module of the same name.
    assert isinstance(ej.error_feedback(ej.top_k(k=1)), ej.Compressor)
    exported = {n for n in dir(ej) if not n.startswith("_")}
    # Submodules imported by the package are visible too; nothing else is.
    assert exported - PUBLIC <= {"algorithms", "base", "compressors", "consistency", "drivers",
                                 "links", "optimizers", "powersgd", "rounds", "sweeps",
                                 "validation"}


def test_algorithm_is_a_namedtuple_of_functions():
    alg = ej.sync_sgd(0.1, 2)
    assert isinstance(alg, ej.Algorithm)
    assert alg._fields == ("init", "view", "local", "combine", "auxiliary", "actual", "info")
    assert alg.num_workers == 2 and alg.info.name == "sync_sgd"
    assert isinstance(alg.info.rule, ej.Rule)
    # A state remembers the algorithm that made it (static, not a leaf).
    state = alg.init({"w": [0.0, 0.0]}, 0)
    assert state.algorithm is alg
