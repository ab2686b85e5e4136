"""Tests for experiments/models.py: parameter counts, shapes, the loss, evaluation, learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data, models


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


@pytest.fixture(scope="module")
def cnn():
    module, init_params = models.make_model("cnn", 10, (8, 8, 1))
    return module, init_params(jax.random.key(0))


@pytest.fixture(scope="module")
def mlp():
    module, init_params = models.make_model("mlp", 10, (8, 8, 1))
    return module, init_params(jax.random.key(0))


def _assert_nonlinear(module, params, shape):
    """An affine map would satisfy f(x) + f(-x) == 2 f(0); ReLUs break that."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, *shape)), jnp.float32)
    apply = jax.jit(module.apply)
    gap = apply({"params": params}, x) + apply({"params": params}, -x)
    gap -= 2 * apply({"params": params}, jnp.zeros_like(x))
    assert float(jnp.max(jnp.abs(gap))) > 1e-2


def test_small_cnn_has_exactly_25290_parameters(cnn):
    module, params = cnn
    assert isinstance(module, models.SmallCNN)
    assert models.num_params(params) == 25_290 == 160 + 4_640 + 20_490
    _assert_nonlinear(module, params, (8, 8, 1))
    shapes = sorted(leaf.shape for leaf in jax.tree.leaves(params))
    assert shapes == sorted([(3, 3, 1, 16), (16,), (3, 3, 16, 32), (32,), (2048, 10), (10,)])


def test_mlp_forward_shape_and_param_count(mlp):
    module, params = mlp
    assert isinstance(module, models.MLP)
    assert models.num_params(params) == 64 * 128 + 128 + 128 * 10 + 10
    _assert_nonlinear(module, params, (8, 8, 1))
    logits = jax.jit(module.apply)({"params": params}, jnp.ones((5, 8, 8, 1)))
    assert logits.shape == (5, 10) and logits.dtype == jnp.float32
    _, init7 = models.make_model("mlp", 7, (8, 8, 1))
    assert jax.eval_shape(init7, jax.random.key(0))["Dense_1"]["bias"].shape == (7,)
    deep = models.MLP(hidden=(16, 8), num_classes=3)
    deep_params = jax.eval_shape(deep.init, jax.random.key(0), jnp.ones((1, 4)))["params"]
    assert [deep_params[f"Dense_{i}"]["kernel"].shape for i in range(3)] == [
        (4, 16),
        (16, 8),
        (8, 3),
    ]


def test_resnet20_forward_shape_and_no_mutable_state():
    module, init_params = models.make_model("resnet20", 10, (32, 32, 3))
    # Shapes from tracing alone: running the initialisers would dominate this test's time.
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert set(variables) == {"params"}  # GroupNorm: no batch statistics.
    shapes = jax.eval_shape(init_params, jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables["params"])
    # Stem, 9 blocks of 2 convolutions, 2 projection shortcuts: 21 conv kernels, then dense.
    kernels = [leaf for leaf in jax.tree.leaves(shapes) if len(leaf.shape) == 4]
    assert len(kernels) == 1 + 18 + 2
    assert {k.shape[-1] for k in kernels} == {16, 32, 64}
    assert 0.25e6 < models.num_params(shapes) < 0.3e6
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes
    )
    logits = jax.jit(module.apply)({"params": params}, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ValueError, match="^groups: got 3"):
        jax.eval_shape(models.ResNet20(groups=3).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_make_model_validation():
    with pytest.raises(ValueError, match="^name: got 'vgg'"):
        models.make_model("vgg", 10, (8, 8, 1))
    with pytest.raises(ValueError, match="^num_classes: got 1"):
        models.make_model("mlp", 1, (8, 8, 1))
    with pytest.raises(ValueError, match="^batch_size: got 0"):
        models.make_eval_fn(models.MLP(), batch_size=0)


def test_classification_loss_is_finite_scalar_with_accuracy(digits, cnn):
    module, params = cnn
    loss_fn = jax.jit(models.classification_loss(module))
    batch = {"x": digits.x_train[:32], "y": digits.y_train[:32]}
    loss, aux = loss_fn(params, batch)
    assert loss.shape == () and bool(jnp.isfinite(loss))
    assert 0.0 <= float(aux["accuracy"]) <= 1.0
    # Near log(10) at initialisation, and exactly the mean cross-entropy of the logits.
    logits = module.apply({"params": params}, batch["x"])
    log_probs = jax.nn.log_softmax(logits)
    expected = -np.mean(np.asarray(log_probs)[np.arange(32), batch["y"]])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    expected_acc = np.mean(np.argmax(np.asarray(logits), -1) == batch["y"])
    np.testing.assert_allclose(float(aux["accuracy"]), expected_acc)


def test_evaluate_matches_one_big_batch_and_pads(digits, mlp):
    module, params = mlp
    x, y = digits.x_test, digits.y_test  # 359 examples: chunks of 100 leave a partial one.
    loss, accuracy = models.evaluate(module, params, x, y, batch_size=100)
    full_loss, aux = models.classification_loss(module)(params, {"x": x, "y": y})
    np.testing.assert_allclose(loss, float(full_loss), rtol=1e-5)
    np.testing.assert_allclose(accuracy, float(aux["accuracy"]), rtol=1e-6)
    assert isinstance(loss, float) and isinstance(accuracy, float)
    # A larger chunk than the dataset works too.
    loss_big, accuracy_big = models.evaluate(module, params, x, y, batch_size=4096)
    np.testing.assert_allclose(loss_big, loss, rtol=1e-5)
    assert accuracy_big == accuracy


def test_sgd_on_digits_with_the_mlp_reduces_the_loss(digits, mlp):
    module, params = mlp
    loss_fn = models.classification_loss(module)

    @jax.jit
    def step(params, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss

    rng = np.random.default_rng(0)
    before = models.evaluate(module, params, digits.x_test, digits.y_test)
    for _ in range(60):
        rows = rng.integers(0, digits.y_train.shape[0], 64)
        params, _ = step(params, {"x": digits.x_train[rows], "y": digits.y_train[rows]})
    after = models.evaluate(module, params, digits.x_test, digits.y_test)
    assert after[0] < 0.5 * before[0]
    assert after[1] > 0.8
