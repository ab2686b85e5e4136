"""The public surface: what `import elastic_jax as ej` offers, and nothing else."""

import elastic_jax as ej

PUBLIC = {
    "WORKER_AXIS", "Algorithm", "AlgorithmInfo", "CompressionInfo", "Compressor", "State",
    "analysis", "async_sgd", "bounds", "elastic_scheduling", "local_sgd",
    "message_passing_sgd", "checks", "compression_info", "delays", "derive_key",
    "error_feedback", "identity", "make_step", "model", "parallel", "params", "qsgd",
    "random_k", "run", "scaled_sign", "sync_sgd", "top_k",
}


def test_public_surface():
    assert set(ej.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(ej, name) is not None
    # The function, not the module of the same name.
    assert isinstance(ej.error_feedback(ej.top_k(k=1)), ej.Compressor)
    exported = {n for n in dir(ej) if not n.startswith("_")}
    # Submodules imported by the package are visible too; nothing else is.
    assert exported - PUBLIC <= {"algorithms", "compressors", "consistency", "core",
                                 "validation"}


def test_algorithm_is_a_namedtuple_of_functions():
    alg = ej.sync_sgd(0.1, 2)
    assert isinstance(alg, ej.Algorithm)
    assert alg._fields == ("init", "views", "update", "local", "combine", "view", "info")
    assert alg.num_workers == 2 and alg.info.name == "sync_sgd"
