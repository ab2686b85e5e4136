"""Datasets, synthetic convex problems, worker partitions and on-device batch sampling.

Plain NumPy until `make_batch_fn`, which moves the data to the device once and
returns a jittable sampler. Batches are dicts `{"x": inputs, "y": labels or
targets}`. Loaders never unpickle: MNIST is read from its IDX files, CIFAR-10 from
its binary distribution; a missing, truncated or corrupt file raises `DataError`,
one line starting with the path.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Batch = Mapping[str, jax.Array]


class DataError(ValueError):
    """A data file is missing, truncated or corrupt; the message names the path."""


class Dataset(NamedTuple):
    """An image classification dataset held in host memory."""

    x_train: np.ndarray  # [n_train, H, W, C] float32 in [0, 1]
    y_train: np.ndarray  # [n_train] int32 in [0, num_classes)
    x_test: np.ndarray  # [n_test, H, W, C] float32 in [0, 1]
    y_test: np.ndarray  # [n_test] int32 in [0, num_classes)
    num_classes: int
    name: str


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, `[N, 8, 8, 1]` in [0, 1], 10
    classes), `test_fraction` held out by a permutation seeded with `seed`."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction: got {test_fraction!r}; expected a number in (0, 1)")
    from sklearn import datasets  # Imported here: scikit-learn is an `experiments` extra.

    bunch = datasets.load_digits()
    images = (np.asarray(bunch.images, np.float64) / 16.0).astype(np.float32)[..., None]
    labels = np.asarray(bunch.target, np.int32)
    n = labels.shape[0]
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return Dataset(images[train], labels[train], images[test], labels[test], 10, "digits")


def _read_bytes(path: str) -> bytes:
    """Reads a whole file, decompressing it if its name ends in `.gz`."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the file ({e})") from None


def _find(data_dir: str, name: str) -> str:
    """Returns `data_dir/name`, or `data_dir/name.gz` if only that exists."""
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
        return path
    if os.path.isfile(path + ".gz"):
        return path + ".gz"
    raise DataError(f"{path}: file not found (nor {name}.gz)")


def _check_labels(path: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and int(labels.max()) >= num_classes:
        bad = int(labels[labels >= num_classes][0])
        raise DataError(f"{path}: label {bad} out of range; expected 0..{num_classes - 1}")


_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.
_MNIST_SIDE = 28


def _read_idx(path: str, *, images: bool) -> np.ndarray:
    """Reads one IDX file of unsigned bytes, checking its header against its size."""
    data = _read_bytes(path)
    ndim, magic, kind = (
        (3, _IDX_IMAGES_MAGIC, "IDX images") if images else (1, _IDX_LABELS_MAGIC, "IDX labels")
    )
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes; expected {header})")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise DataError(f"{path}: wrong magic number {got}; expected {magic} ({kind})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if images and dims[1:] != (_MNIST_SIDE, _MNIST_SIDE):
        raise DataError(
            f"{path}: images are {dims[1]}x{dims[2]}; expected {_MNIST_SIDE}x{_MNIST_SIDE}"
        )
    if dims[0] == 0:
        raise DataError(f"{path}: the header says the file holds no examples")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes, but the header ({dims[0]} examples) "
                        f"implies {expected}; truncated or corrupt")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def load_mnist(data_dir: str) -> Dataset:
    """MNIST (`[N, 28, 28, 1]` in [0, 1]) from `train-images-idx3-ubyte`,
    `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`
    in `data_dir` (each may end in `.gz`); `DataError` for a missing file, a wrong
    magic number, image size or length, a label outside 0..9, or differing counts."""
    splits = []
    for prefix in ("train", "t10k"):
        images_path = _find(data_dir, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(data_dir, f"{prefix}-labels-idx1-ubyte")
        images = _read_idx(images_path, images=True)
        labels = _read_idx(labels_path, images=False)
        _check_labels(labels_path, labels, 10)
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{labels_path}: {labels.shape[0]} labels, but {images_path} "
                            f"holds {images.shape[0]} images")
        splits.append(((images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32)))
    (x_train, y_train), (x_test, y_test) = splits
    return Dataset(x_train, y_train, x_test, y_test, 10, "mnist")


_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_RECORD = 1 + _CIFAR_PIXELS  # One label byte, then the image in CHW order.
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = "test_batch.bin"


def _read_cifar_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 binary batch: `[n, 32, 32, 3]` uint8 images, `[n]` labels."""
    data = _read_bytes(path)
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise DataError(f"{path}: {len(data)} bytes is not a positive multiple of the "
                        f"{_CIFAR_RECORD}-byte record (1 label + {_CIFAR_PIXELS} pixels)")
    records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    _check_labels(path, labels, 10)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def load_cifar10(data_dir: str) -> Dataset:
    """CIFAR-10 (`[N, 32, 32, 3]` in [0, 1]) from its binary distribution:
    `data_batch_1.bin` ... `data_batch_5.bin` and `test_batch.bin` in `data_dir` or its
    `cifar-10-batches-bin`; `DataError` for a missing file, a size that is not a
    multiple of the 3,073-byte record, or a label outside 0..9."""
    sub = os.path.join(data_dir, "cifar-10-batches-bin")
    root = sub if os.path.isdir(sub) else data_dir
    train = [_read_cifar_file(os.path.join(root, name)) for name in _CIFAR_TRAIN]
    x_test, y_test = _read_cifar_file(os.path.join(root, _CIFAR_TEST))

    def to_float(images: np.ndarray) -> np.ndarray:
        return images.astype(np.float32) / 255.0

    x_train = to_float(np.concatenate([x for x, _ in train]))
    y_train = np.concatenate([y for _, y in train]).astype(np.int32)
    return Dataset(x_train, y_train, to_float(x_test), y_test.astype(np.int32), 10, "cifar10")


DATASETS = ("digits", "mnist", "cifar10")


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """`"digits"` (bundled), `"mnist"` or `"cifar10"` (from `data_dir`, which they need)."""
    if name not in DATASETS:
        raise ValueError(f"name: got {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits()
    if data_dir is None:
        raise ValueError(f"data_dir: got None; expected the directory holding the {name} "
                         "files (only 'digits' is bundled)")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: not a directory")
    return load_mnist(data_dir) if name == "mnist" else load_cifar10(data_dir)


class ConvexProblem(NamedTuple):
    """A finite sum `f(w) = (1/n) sum_i f_i(w)` with known constants (float64 NumPy arrays;
    `loss_fn` computes in the dtype of its inputs)."""

    a: np.ndarray  # [n, dim] float64 features.
    b: np.ndarray  # [n] float64 targets (least squares) or labels in {-1, +1} (logistic).
    loss_fn: Callable[[Mapping[str, jax.Array], Batch], jax.Array]  # ({"w"}, {"x", "y"}) -> []
    full_loss: Callable[[Mapping[str, jax.Array]], jax.Array]  # f over all n samples.
    smoothness: float  # L: the largest eigenvalue of the Hessian (an upper bound, logistic).
    strong_convexity: float  # c: the smallest eigenvalue of the Hessian (reg, logistic).
    x_star: np.ndarray  # [dim] float64 minimiser.
    f_star: float  # f(x_star), in float64.
    grad_norm_bound: Callable[[float], float]  # radius r -> M over ||w - x_star|| <= r.
    name: str


def _check_sizes(num_samples: int, dim: int) -> None:
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples: got {num_samples!r}; expected an integer >= 1")
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim: got {dim!r}; expected an integer >= 1")


def _check_radius(radius: float) -> float:
    if not radius >= 0.0:
        raise ValueError(f"radius: got {radius!r}; expected a number >= 0")
    return float(radius)


def _with_full_loss(loss_fn: Callable, a: np.ndarray, b: np.ndarray) -> Callable:
    def full_loss(params: Mapping[str, jax.Array]) -> jax.Array:
        dtype = jnp.asarray(params["w"]).dtype
        return loss_fn(params, {"x": jnp.asarray(a, dtype), "y": jnp.asarray(b, dtype)})

    return full_loss


def _least_squares_loss(params: Mapping[str, jax.Array], batch: Batch) -> jax.Array:
    residual = batch["x"] @ params["w"] - batch["y"]
    return 0.5 * jnp.mean(jnp.square(residual))


def least_squares(
    num_samples: int, dim: int, *, noise: float = 0.1, seed: int = 0
) -> ConvexProblem:
    """Gaussian linear regression, `f(w) = (1/2n) ||A w - b||^2`.

    `A` is standard normal, `b = A w_true + noise * eps`, `w_true ~ N(0, I / dim)`.
    With `H = A^T A / n`: `L = lambda_max(H)`, `c = lambda_min(H)` (0 when
    `num_samples < dim`); `x_star` is the minimum-norm solution. `grad_norm_bound(r)`
    is the supremum over `||w - x_star|| <= r` of the largest per-sample (hence every
    minibatch) gradient norm, `max_i ||a_i|| (|a_i . x_star - b_i| + ||a_i|| r)`.
    """
    _check_sizes(num_samples, dim)
    if not noise >= 0.0:
        raise ValueError(f"noise: got {noise!r}; expected a number >= 0")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((num_samples, dim))
    w_true = rng.standard_normal(dim) / np.sqrt(dim)
    b = a @ w_true + noise * rng.standard_normal(num_samples)
    eigenvalues = np.linalg.eigvalsh(a.T @ a / num_samples)
    x_star = np.linalg.lstsq(a, b, rcond=None)[0]
    residual = a @ x_star - b
    f_star = 0.5 * float(np.mean(residual**2))
    row_norms = np.linalg.norm(a, axis=1)

    def grad_norm_bound(radius: float) -> float:
        r = _check_radius(radius)
        return float(np.max(row_norms * (np.abs(residual) + row_norms * r)))

    return ConvexProblem(
        a=a,
        b=b,
        loss_fn=_least_squares_loss,
        full_loss=_with_full_loss(_least_squares_loss, a, b),
        smoothness=float(eigenvalues[-1]),
        strong_convexity=float(max(eigenvalues[0], 0.0)),
        x_star=x_star,
        f_star=f_star,
        grad_norm_bound=grad_norm_bound,
        name="least_squares",
    )


def _logistic_np(
    a: np.ndarray, b: np.ndarray, reg: float, w: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Loss, gradient and Hessian of the regularised logistic loss, in float64."""
    n = a.shape[0]
    margins = b * (a @ w)
    loss = float(np.mean(np.logaddexp(0.0, -margins)) + 0.5 * reg * w @ w)
    s = np.exp(-np.logaddexp(0.0, margins))  # sigmoid(-margin), computed stably.
    grad = -(a.T @ (b * s)) / n + reg * w
    hess = (a.T * (s * (1.0 - s))) @ a / n + reg * np.eye(a.shape[1])
    return loss, grad, hess


def logistic_regression(
    num_samples: int, dim: int, *, seed: int = 0, reg: float = 0.01
) -> ConvexProblem:
    """L2-regularised logistic regression, `f(w) = mean log(1 + e^{-b_i a_i.w}) + reg/2 ||w||^2`.

    `A` is standard normal, `P(b_i = 1) = sigmoid(a_i . w_true)`, `w_true ~ N(0, 4 I /
    dim)`, labels in {-1, +1}. `L = ||A||_2^2 / (4n) + reg` (an upper bound: the
    logistic curvature is at most 1/4), `c = reg > 0`; `x_star` from damped Newton
    steps in float64 to a gradient norm below 1e-13. `grad_norm_bound(r) = max_i
    ||a_i|| + reg (||x_star|| + r)` bounds every gradient over `||w - x_star|| <= r`.
    """
    _check_sizes(num_samples, dim)
    if not (reg > 0.0 and np.isfinite(reg)):
        raise ValueError(f"reg: got {reg!r}; expected a finite number > 0")
    reg = float(reg)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((num_samples, dim))
    w_true = 2.0 * rng.standard_normal(dim) / np.sqrt(dim)
    prob = 1.0 / (1.0 + np.exp(-(a @ w_true)))
    b = np.where(rng.uniform(size=num_samples) < prob, 1.0, -1.0)

    w = np.zeros(dim)
    loss, grad, hess = _logistic_np(a, b, reg, w)
    for _ in range(200):
        if np.linalg.norm(grad) <= 1e-13:
            break
        step = np.linalg.solve(hess, -grad)
        t = 1.0
        while True:  # Armijo backtracking: Newton converges globally on this problem.
            new = w + t * step
            new_loss, new_grad, new_hess = _logistic_np(a, b, reg, new)
            if new_loss <= loss + 1e-4 * t * (grad @ step) or t < 1e-10:
                break
            t *= 0.5
        if new_loss > loss:  # Rounding floor reached: no further progress is possible.
            break
        w, loss, grad, hess = new, new_loss, new_grad, new_hess

    def loss_fn(params: Mapping[str, jax.Array], batch: Batch) -> jax.Array:
        w = params["w"]
        margins = batch["y"] * (batch["x"] @ w)
        return jnp.mean(jax.nn.softplus(-margins)) + 0.5 * reg * jnp.sum(jnp.square(w))

    spectral_norm = float(np.linalg.norm(a, 2))
    max_row_norm = float(np.max(np.linalg.norm(a, axis=1)))
    norm_star = float(np.linalg.norm(w))

    def grad_norm_bound(radius: float) -> float:
        return max_row_norm + reg * (norm_star + _check_radius(radius))

    return ConvexProblem(
        a=a,
        b=b,
        loss_fn=loss_fn,
        full_loss=_with_full_loss(loss_fn, a, b),
        smoothness=spectral_norm**2 / (4.0 * num_samples) + reg,
        strong_convexity=reg,
        x_star=w,
        f_star=loss,
        grad_norm_bound=grad_norm_bound,
        name="logistic_regression",
    )


class Partition(NamedTuple):
    """Worker `p`'s sorted sample indices in the first `counts[p]` entries of row `p`."""

    indices: np.ndarray  # [P, n_max] int32; -1 past counts[p].
    counts: np.ndarray  # [P] int32, every entry >= 1.

    def shards(self) -> list[np.ndarray]:
        """Returns the `P` shards as a list of index arrays."""
        return [row[:count] for row, count in zip(self.indices, self.counts, strict=True)]


PARTITION_KINDS = ("iid", "dirichlet")


def partition(
    labels: np.ndarray, num_workers: int, *, kind: str = "iid", alpha: float = 0.5, seed: int = 0
) -> Partition:
    """Splits the indices of `labels` among `num_workers` (<= n) workers; each index once.

    `"iid"`: a random permutation cut into shards whose sizes differ by at most one.
    `"dirichlet"`: each class's shuffled samples are cut in proportions drawn from
    `Dirichlet(alpha * 1_P)` (Hsu et al., 2019, arXiv:1909.06335; small `alpha`: few
    classes per worker); a worker left empty takes one random sample of the largest
    shard. A bad argument raises a one-line `ValueError` naming it.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: got shape {labels.shape} and dtype {labels.dtype}; "
                         "expected a 1-D integer array")
    n = labels.shape[0]
    if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 1:
        raise ValueError(f"num_workers: got {num_workers!r}; expected an integer >= 1")
    if num_workers > n:
        raise ValueError(
            f"num_workers: got {num_workers}; expected at most the number of samples, {n}"
        )
    if kind not in PARTITION_KINDS:
        raise ValueError(f"kind: got {kind!r}; expected one of {', '.join(PARTITION_KINDS)}")
    if not (alpha > 0.0 and np.isfinite(alpha)):
        raise ValueError(f"alpha: got {alpha!r}; expected a finite number > 0")
    num_workers = int(num_workers)
    rng = np.random.default_rng(seed)

    if kind == "iid":
        shards = np.array_split(rng.permutation(n), num_workers)
    else:
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_workers)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_workers, float(alpha)))
            cuts = np.clip(np.round(np.cumsum(shares)[:-1] * members.size), 0, members.size)
            for p, piece in enumerate(np.split(members, cuts.astype(np.int64))):
                pieces[p].append(piece)
        shards = [np.concatenate(p) for p in pieces]
        for p in range(num_workers):
            if shards[p].size == 0:  # n >= P, so the largest shard has >= 2 samples here.
                donor = int(np.argmax([s.size for s in shards]))
                j = int(rng.integers(shards[donor].size))
                shards[p] = shards[donor][j : j + 1]
                shards[donor] = np.delete(shards[donor], j)

    counts = np.array([s.size for s in shards], np.int32)
    indices = np.full((num_workers, int(counts.max())), -1, np.int32)
    for p, shard in enumerate(shards):
        indices[p, : shard.size] = np.sort(shard)
    return Partition(indices, counts)


def make_batch_fn(
    x: np.ndarray, y: np.ndarray, indices: np.ndarray, counts: np.ndarray, batch_size: int
) -> Callable[[jax.Array, jax.Array], Batch]:
    """A jittable sampler over data moved to the device once, here.

    `batch_fn(round, worker_keys) -> {"x": [P, batch_size, ...], "y": [P, batch_size]}`:
    worker `p` draws `batch_size` positions of its shard (`indices[p, :counts[p]]`,
    a `Partition`) uniformly with replacement with `worker_keys[p]` (typed keys `[P]`;
    the round enters only through them, docs/design.md, "Randomness").
    """
    x_np, y_np = np.asarray(x), np.asarray(y)
    indices, counts = np.asarray(indices), np.asarray(counts)
    if x_np.ndim < 1 or y_np.ndim != 1 or x_np.shape[0] != y_np.shape[0]:
        raise ValueError(
            f"x, y: got shapes {x_np.shape} and {y_np.shape}; expected [n, ...] and [n]"
        )
    if indices.ndim != 2 or indices.shape[1] < 1:
        raise ValueError(f"indices: got shape {indices.shape}; expected [P, n_max], n_max >= 1")
    if counts.shape != indices.shape[:1]:
        raise ValueError(f"counts: got shape {counts.shape}; expected [{indices.shape[0]}]")
    if counts.min() < 1 or counts.max() > indices.shape[1]:
        raise ValueError(f"counts: got values in [{counts.min()}, {counts.max()}]; expected "
                         f"values in [1, {indices.shape[1]}]")
    used = np.concatenate([row[:c] for row, c in zip(indices, counts, strict=True)])
    if used.min() < 0 or used.max() >= x_np.shape[0]:
        raise ValueError(f"indices: got values in [{used.min()}, {used.max()}] within counts; "
                         f"expected values in [0, {x_np.shape[0] - 1}]")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}; expected an integer >= 1")
    batch_size = int(batch_size)
    num_workers = indices.shape[0]
    x_dev, y_dev = jnp.asarray(x_np), jnp.asarray(y_np)
    shards = jnp.asarray(indices, jnp.int32)
    sizes = jnp.asarray(counts, jnp.int32)

    def sample_rows(key: jax.Array, shard: jax.Array, size: jax.Array) -> jax.Array:
        positions = jax.random.randint(key, (batch_size,), 0, size)
        return shard[positions]

    def batch_fn(round: jax.Array, worker_keys: jax.Array) -> Batch:
        del round  # The round enters only through the keys.
        if not jnp.issubdtype(worker_keys.dtype, jax.dtypes.prng_key) or worker_keys.shape != (
            num_workers,
        ):
            raise ValueError(f"worker_keys: got dtype {worker_keys.dtype} and shape "
                             f"{worker_keys.shape}; expected a typed PRNG key array of shape "
                             f"[{num_workers}] (jax.random.key)")
        rows = jax.vmap(sample_rows)(worker_keys, shards, sizes)  # [P, batch_size]
        return {"x": x_dev[rows], "y": y_dev[rows]}

    return batch_fn
