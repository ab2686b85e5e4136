"""Tests for experiments/data.py: loaders, corrupt files, convex problems, partitions, sampling."""

import gzip
import os
import pickle
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import data

# ------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def test_digits_shapes_ranges_and_split(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    n_train, n_test = digits.y_train.shape[0], digits.y_test.shape[0]
    assert n_train + n_test == 1797
    assert n_test == round(0.2 * 1797)
    assert digits.x_train.shape == (n_train, 8, 8, 1)
    assert digits.x_test.shape == (n_test, 8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    assert set(np.unique(digits.y_train)) == set(range(10))
    # Grey levels are k / 16 exactly.
    np.testing.assert_array_equal(digits.x_train * 16, np.round(digits.x_train * 16))


def test_digits_split_is_deterministic_and_disjoint(digits):
    again = data.load_digits()
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    other = data.load_digits(seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)
    # Train and test together are the whole set: compare sorted image rows with sklearn's.
    from sklearn.datasets import load_digits

    def rows(x):
        flat = x.reshape(x.shape[0], -1)
        return flat[np.lexsort(flat.T[::-1])]

    both = np.concatenate([digits.x_train, digits.x_test])
    np.testing.assert_array_equal(rows(both * 16), rows(load_digits().images[..., None]))
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=1.0)


def test_load_dataset_names():
    assert data.load_dataset("digits").name == "digits"
    with pytest.raises(ValueError, match="name: got 'imagenet'"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="data_dir"):
        data.load_dataset("mnist")
    with pytest.raises(data.DataError, match="not a directory"):
        data.load_dataset("cifar10", "/nonexistent/dir")


# ------------------------------------------------------------------------- MNIST


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root, rng, n_train=5, n_test=3, compress=()):
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[prefix] = (images, labels)
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            name = f"{prefix}-{kind}-ubyte"
            blob = _idx_bytes(array, magic)
            if name in compress:
                with gzip.open(os.path.join(root, name + ".gz"), "wb") as f:
                    f.write(blob)
            else:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(blob)
    return arrays


@pytest.mark.parametrize("compress", [(), ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")])
def test_mnist_loads_values_and_labels(tmp_path, compress):
    arrays = _write_mnist(tmp_path, np.random.default_rng(0), compress=compress)
    ds = data.load_mnist(str(tmp_path))
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (5, 28, 28, 1) and ds.x_test.shape == (3, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_array_equal(np.round(ds.x_train[..., 0] * 255), arrays["train"][0])
    np.testing.assert_array_equal(np.round(ds.x_test[..., 0] * 255), arrays["t10k"][0])
    np.testing.assert_array_equal(ds.y_train, arrays["train"][1])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k"][1])
    assert data.load_dataset("mnist", str(tmp_path)).x_train.shape == (5, 28, 28, 1)


def _corrupt(path, how):
    with open(path, "rb") as f:
        raw = f.read()
    if how == "truncate":
        raw = raw[:-7]
    elif how == "magic":
        raw = (1234).to_bytes(4, "big") + raw[4:]
    elif how == "label":
        raw = raw[:-1] + bytes([10])
    elif how == "header":
        raw = raw[:6]
    elif how == "dims":
        raw = raw[:8] + (27).to_bytes(4, "big") + raw[12:]
    elif how == "extra":
        raw = raw + b"\0"
    with open(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize(
    "name, how, message",
    [
        ("train-images-idx3-ubyte", "truncate", "truncated or corrupt"),
        ("train-images-idx3-ubyte", "extra", "implies"),
        ("t10k-images-idx3-ubyte", "magic", "wrong magic number 1234; expected 2051"),
        ("train-labels-idx1-ubyte", "magic", "wrong magic number 1234; expected 2049"),
        ("t10k-labels-idx1-ubyte", "label", "label 10 out of range"),
        ("train-labels-idx1-ubyte", "header", "truncated header"),
        ("t10k-images-idx3-ubyte", "dims", "expected 28x28"),
    ],
)
def test_mnist_corrupt_files(tmp_path, name, how, message):
    _write_mnist(tmp_path, np.random.default_rng(1))
    path = os.path.join(tmp_path, name)
    _corrupt(path, how)
    with pytest.raises(data.DataError, match=message) as info:
        data.load_mnist(str(tmp_path))
    assert str(info.value).startswith(path + ": ")
    assert "\n" not in str(info.value)


def test_mnist_missing_file_and_count_mismatch(tmp_path):
    rng = np.random.default_rng(2)
    _write_mnist(tmp_path, rng)
    path = os.path.join(tmp_path, "t10k-labels-idx1-ubyte")
    with open(path, "wb") as f:  # 4 labels for 3 images.
        f.write(_idx_bytes(np.arange(4), 2049))
    with pytest.raises(data.DataError, match="4 labels, but .* holds 3 images") as info:
        data.load_mnist(str(tmp_path))
    assert str(info.value).startswith(path + ": ")
    os.remove(path)
    with pytest.raises(data.DataError, match="file not found") as info:
        data.load_mnist(str(tmp_path))
    assert str(info.value).startswith(path + ": ")


def test_mnist_corrupt_gzip(tmp_path):
    _write_mnist(tmp_path, np.random.default_rng(3), compress=("train-labels-idx1-ubyte",))
    path = os.path.join(tmp_path, "train-labels-idx1-ubyte.gz")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(data.DataError) as info:
        data.load_mnist(str(tmp_path))
    assert str(info.value).startswith(path + ": ")


# ---------------------------------------------------------------------- CIFAR-10


def _write_cifar(root, rng, per_file=2):
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        images = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)  # CHW
        records = np.concatenate([labels[:, None], images.reshape(per_file, -1)], axis=1)
        (root / name).write_bytes(records.tobytes())
        written[name] = (images, labels)
    return written


@pytest.mark.parametrize("subdir", [False, True])
def test_cifar_loads_values_and_labels(tmp_path, subdir):
    root = tmp_path / "cifar-10-batches-bin" if subdir else tmp_path
    written = _write_cifar(root, np.random.default_rng(4))
    ds = data.load_cifar10(str(tmp_path))
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (2, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
    train_images = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    train_labels = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(np.round(ds.x_train * 255), train_images.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ds.y_train, train_labels)
    np.testing.assert_array_equal(ds.y_test, written["test_batch.bin"][1])
    # Channel order: pixel (0, 0) of image 0 reads (R, G, B) from the three CHW planes.
    np.testing.assert_array_equal(
        np.round(ds.x_test[0, 0, 0] * 255), written["test_batch.bin"][0][0, :, 0, 0]
    )


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncate", "not a positive multiple of the 3073-byte record"),
        ("label", "label 10 out of range"),
        ("empty", "0 bytes"),
        ("missing", "file not found"),
    ],
)
def test_cifar_corrupt_files(tmp_path, how, message):
    _write_cifar(tmp_path, np.random.default_rng(5))
    path = tmp_path / "data_batch_3.bin"
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[:-1])
    elif how == "label":
        path.write_bytes(raw[:3073] + bytes([10]) + raw[3074:])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(data.DataError, match=message) as info:
        data.load_cifar10(str(tmp_path))
    assert str(info.value).startswith(str(path) + ": ")


@pytest.mark.parametrize("name", ["data_batch_1.bin", "test_batch.bin"])
def test_cifar_label_out_of_range_in_any_file(tmp_path, name):
    _write_cifar(tmp_path, np.random.default_rng(6))
    path = tmp_path / name
    raw = bytearray(path.read_bytes())
    raw[0] = 255  # the first record's label byte
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="label 255 out of range; expected 0..9") as info:
        data.load_cifar10(str(tmp_path))
    assert str(info.value).startswith(str(path) + ": ") and "\n" not in str(info.value)


def test_loaders_never_unpickle_or_open_a_connection(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a loader unpickled or opened a connection")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    (tmp_path / "mnist").mkdir()
    _write_mnist(tmp_path / "mnist", np.random.default_rng(7), compress=("t10k-images-idx3-ubyte",))
    assert data.load_dataset("mnist", str(tmp_path / "mnist")).x_train.shape[0] == 5
    _write_cifar(tmp_path / "cifar", np.random.default_rng(8))
    assert data.load_dataset("cifar10", str(tmp_path / "cifar")).x_test.shape[0] == 2
    assert data.load_dataset("digits").num_classes == 10


# --------------------------------------------------------------- convex problems


def test_least_squares_constants_and_minimiser():
    problem = data.least_squares(200, 10, noise=0.1, seed=3)
    a, b = problem.a, problem.b
    assert a.shape == (200, 10) and b.shape == (200,) and problem.x_star.dtype == np.float64
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(problem.x_star)}
        grad = jax.jit(jax.grad(problem.full_loss))(params)["w"]
        hessian = jax.jit(jax.hessian(lambda w: problem.full_loss({"w": w})))(params["w"])
        f_star = float(problem.full_loss(params))
        shifted = float(problem.full_loss({"w": params["w"] + 0.01}))
    assert grad.dtype == jnp.float64
    assert np.linalg.norm(grad) < 1e-12
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian))
    np.testing.assert_allclose(problem.smoothness, eigenvalues[-1], rtol=1e-10)
    np.testing.assert_allclose(problem.strong_convexity, eigenvalues[0], rtol=1e-10)
    assert 0 < problem.strong_convexity < problem.smoothness
    np.testing.assert_allclose(f_star, problem.f_star, rtol=1e-12)
    assert shifted > f_star
    # The per-sample gradient bound holds at random points of the ball and is nearly tight.
    radius, rng = 0.5, np.random.default_rng(0)
    bound = problem.grad_norm_bound(radius)
    worst = 0.0
    for _ in range(200):
        d = rng.standard_normal(10)
        w = problem.x_star + radius * d / np.linalg.norm(d)
        per_sample = np.abs(a @ w - b) * np.linalg.norm(a, axis=1)
        worst = max(worst, per_sample.max())
    assert worst <= bound and worst > 0.5 * bound
    with pytest.raises(ValueError, match="radius"):
        problem.grad_norm_bound(-1.0)


def test_least_squares_underdetermined_has_zero_strong_convexity():
    problem = data.least_squares(5, 8)
    assert problem.strong_convexity == 0.0
    np.testing.assert_allclose(problem.f_star, 0.0, atol=1e-20)


def test_logistic_regression_minimiser_and_constants():
    problem = data.logistic_regression(300, 6, seed=1, reg=0.01)
    assert set(np.unique(problem.b)) == {-1.0, 1.0}
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(problem.x_star)}
        grad = jax.jit(jax.grad(problem.full_loss))(params)["w"]
        hessian = np.asarray(
            jax.jit(jax.hessian(lambda w: problem.full_loss({"w": w})))(params["w"])
        )
        f_star = float(problem.full_loss(params))
    assert np.linalg.norm(grad) < 1e-12
    np.testing.assert_allclose(f_star, problem.f_star, rtol=1e-12)
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert problem.strong_convexity == 0.01 <= eigenvalues[0]
    assert eigenvalues[-1] <= problem.smoothness
    expected_l = np.linalg.norm(problem.a, 2) ** 2 / (4 * 300) + 0.01
    np.testing.assert_allclose(problem.smoothness, expected_l, rtol=1e-12)
    assert problem.grad_norm_bound(1.0) > problem.grad_norm_bound(0.0) > 0
    with pytest.raises(ValueError, match="reg: got 0.0"):
        data.logistic_regression(10, 2, reg=0.0)


def test_convex_loss_fn_on_a_minibatch_matches_numpy():
    problem = data.least_squares(50, 4)
    w = np.linspace(-1, 1, 4)
    batch = {
        "x": jnp.asarray(problem.a[:7], jnp.float32),
        "y": jnp.asarray(problem.b[:7], jnp.float32),
    }
    got = problem.loss_fn({"w": jnp.asarray(w, jnp.float32)}, batch)
    expected = 0.5 * np.mean((problem.a[:7] @ w - problem.b[:7]) ** 2)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_samples": 0, "dim": 3}, "num_samples"),
        ({"num_samples": 3, "dim": 0}, "dim"),
        ({"num_samples": 3, "dim": 2, "noise": -1.0}, "noise"),
    ],
)
def test_least_squares_validation(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}: got"):
        data.least_squares(**kwargs)


# -------------------------------------------------------------------- partitions


def _labels(n=600, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n).astype(np.int32)


def _check_cover(part, n):
    shards = part.shards()
    assert part.indices.dtype == np.int32 and part.counts.dtype == np.int32
    assert part.indices.shape == (len(shards), part.counts.max())
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(n))
    for row, count in zip(part.indices, part.counts, strict=True):
        assert np.all(row[count:] == -1)
        assert count >= 1


def test_iid_partition_covers_once_and_is_balanced():
    labels = _labels(n=103)
    part = data.partition(labels, 8, kind="iid", seed=0)
    _check_cover(part, 103)
    assert part.counts.max() - part.counts.min() <= 1
    again = data.partition(labels, 8, kind="iid", seed=0)
    np.testing.assert_array_equal(again.indices, part.indices)
    # Shards are random, not contiguous: on sorted labels every worker still sees most classes.
    sorted_labels = np.repeat(np.arange(10, dtype=np.int32), 60)
    shuffled = data.partition(sorted_labels, 8, kind="iid", seed=0)
    assert min(np.unique(sorted_labels[s]).size for s in shuffled.shards()) >= 8


def _label_histograms(part, labels, classes=10):
    return np.stack([np.bincount(labels[s], minlength=classes) / s.size for s in part.shards()])


def test_dirichlet_partition_covers_once_nonempty_and_skewed():
    labels = _labels()
    skewed = data.partition(labels, 8, kind="dirichlet", alpha=0.05, seed=0)
    _check_cover(skewed, labels.size)
    near_iid = data.partition(labels, 8, kind="dirichlet", alpha=1000.0, seed=0)
    _check_cover(near_iid, labels.size)
    global_hist = np.bincount(labels, minlength=10) / labels.size
    # Total-variation distance of each worker's label distribution from the global one.
    tv = lambda part: 0.5 * np.abs(_label_histograms(part, labels) - global_hist).sum(1)
    assert tv(skewed).mean() > 0.4
    assert tv(near_iid).mean() < 0.15
    # With tiny alpha, most workers see few classes.
    assert np.median((_label_histograms(skewed, labels) > 0).sum(1)) <= 4


def test_dirichlet_partition_every_worker_nonempty_when_tight():
    labels = np.zeros(12, np.int32)  # One class, tiny alpha: the Dirichlet leaves most empty.
    for seed in range(5):
        part = data.partition(labels, 12, kind="dirichlet", alpha=0.01, seed=seed)
        _check_cover(part, 12)
        np.testing.assert_array_equal(part.counts, np.ones(12))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_workers": 0}, "num_workers: got 0"),
        ({"num_workers": 2.5}, "num_workers: got 2.5"),
        ({"num_workers": 1000}, "num_workers: got 1000"),
        ({"num_workers": 2, "kind": "pathological"}, "kind: got 'pathological'"),
        ({"num_workers": 2, "kind": "dirichlet", "alpha": 0.0}, "alpha: got 0.0"),
        ({"num_workers": 2, "alpha": -1.0}, "alpha: got -1.0"),
    ],
)
def test_partition_validation(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}; expected"):
        data.partition(_labels(n=20), **kwargs)
    with pytest.raises(ValueError, match="^labels: got"):
        data.partition(np.zeros((3, 2), np.int32), 2)


# --------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def sampler():
    n = 60
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
    y = np.arange(n, dtype=np.int32)  # Label == index, so batches reveal their rows.
    part = data.partition(np.arange(n) % 3, 4, kind="dirichlet", alpha=0.3, seed=1)
    batch_fn = data.make_batch_fn(x, y, *part, batch_size=16)
    return part, batch_fn, jax.jit(batch_fn)


def _keys(seed, num_workers=4):
    return jax.vmap(lambda p: jax.random.fold_in(jax.random.key(seed), p))(jnp.arange(num_workers))


def test_batch_fn_shapes_and_own_shard(sampler):
    part, batch_fn, jitted = sampler
    batch = jitted(jnp.int32(3), _keys(0))
    assert batch["x"].shape == (4, 16, 2, 2, 1) and batch["x"].dtype == jnp.float32
    assert batch["y"].shape == (4, 16) and batch["y"].dtype == jnp.int32
    y = np.asarray(batch["y"])
    np.testing.assert_array_equal(np.asarray(batch["x"])[:, :, 0, 0, 0], y)
    shards = part.shards()
    seen = [set() for _ in shards]
    for seed in range(20):
        y = np.asarray(jitted(0, _keys(seed))["y"])
        for p, shard in enumerate(shards):
            assert set(y[p]) <= set(shard)
            seen[p] |= set(y[p])
    # Sampling reaches every sample of a small shard.
    for p, shard in enumerate(shards):
        if shard.size <= 8:
            assert seen[p] == set(shard)


def test_batch_fn_is_deterministic_in_the_keys_only(sampler):
    _, batch_fn, jitted = sampler
    a = jitted(0, _keys(7))
    b = jitted(5, _keys(7))  # The round does not matter, only the keys.
    c = batch_fn(0, _keys(7))  # Eager and jitted agree.
    d = jitted(0, _keys(8))
    np.testing.assert_array_equal(a["y"], b["y"])
    np.testing.assert_array_equal(a["y"], c["y"])
    assert not np.array_equal(a["y"], d["y"])


def test_batch_fn_validation(sampler):
    part, batch_fn, _ = sampler
    with pytest.raises(ValueError, match="worker_keys"):
        batch_fn(0, _keys(0, num_workers=3))
    with pytest.raises(ValueError, match="worker_keys"):
        batch_fn(0, jax.random.PRNGKey(0))
    x, y = np.zeros((60, 1), np.float32), np.zeros(60, np.int32)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_batch_fn(x, y, *part, batch_size=0)
    with pytest.raises(ValueError, match="counts"):
        data.make_batch_fn(x, y, part.indices, part.counts[:2], batch_size=4)
    with pytest.raises(ValueError, match="indices"):
        data.make_batch_fn(x[:10], y[:10], *part, batch_size=4)


def test_batch_fn_on_a_convex_problem():
    problem = data.least_squares(40, 3)
    part = data.partition(np.zeros(40, np.int64), 2)
    batch = jax.jit(data.make_batch_fn(problem.a, problem.b, *part, batch_size=5))(0, _keys(0, 2))
    assert batch["x"].shape == (2, 5, 3) and batch["y"].shape == (2, 5)
    loss = problem.loss_fn(
        {"w": jnp.zeros(3, batch["x"].dtype)}, jax.tree.map(lambda v: v[0], batch)
    )
    assert loss.shape == () and np.isfinite(float(loss))
