"""Flax models for the experiments, and the classification loss the library sees.

Every model is a stateless `flax.linen` module (no BatchNorm: ResNet-20 uses
GroupNorm), so its parameters are the whole of its state and
`loss_fn(params, batch)` is all that `elastic_jax` needs. Batches are dicts with
`"x"` (images `[b, H, W, C]`) and `"y"` (int labels `[b]`), as made by
`experiments.data.make_batch_fn`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any  # A pytree of arrays (the "params" collection of a linen module).
Batch = Mapping[str, jax.Array]


class MLP(nn.Module):
    """A ReLU multilayer perceptron on flattened inputs (`hidden`: the layers' widths)."""

    hidden: Sequence[int] = (128,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
    """Conv 3x3x16 + ReLU, conv 3x3x32 + ReLU (both SAME), flatten, dense: on 8x8x1 inputs
    with 10 classes, 160 + 4,640 + 20,490 = 25,290 parameters."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x))
        x = nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a residual connection (a strided 1x1
    convolution and GroupNorm where the resolution or width changes: option B)."""

    channels: int
    strides: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(nn.Conv, self.channels, use_bias=False)
        y = conv((3, 3), strides=self.strides, padding="SAME")(x)
        y = nn.relu(nn.GroupNorm(num_groups=self.groups)(y))
        y = conv((3, 3), padding="SAME")(y)
        y = nn.GroupNorm(num_groups=self.groups)(y)
        if self.strides != 1 or x.shape[-1] != self.channels:
            x = conv((1, 1), strides=self.strides)(x)
            x = nn.GroupNorm(num_groups=self.groups)(x)
        return nn.relu(x + y)


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 images (He et al., 2016, arXiv:1512.03385), with GroupNorm.

    A 3x3x16 stem, 3 stages of 3 basic blocks with 16, 32 and 64 channels (the last two
    halve the resolution), global average pooling, a dense layer. GroupNorm (`groups`
    must divide 16) replaces BatchNorm, as usual for decentralised training (Hsieh et
    al., 2020, arXiv:1910.00189): the model has no mutable state.
    """

    num_classes: int = 10
    groups: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if 16 % self.groups:
            raise ValueError(f"groups: got {self.groups}; expected a divisor of 16")
        x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False)(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups)(x))
        for stage, channels in enumerate((16, 32, 64)):
            for block in range(3):
                strides = 2 if stage > 0 and block == 0 else 1
                x = _BasicBlock(channels, strides, self.groups)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


MODELS = ("mlp", "cnn", "resnet20")


def make_model(
    name: str, num_classes: int, input_shape: Sequence[int]
) -> tuple[nn.Module, Callable[[jax.Array], Params]]:
    """`(module, init_params)`: `"mlp"` (one hidden layer of 128), `"cnn"` (`SmallCNN`) or
    `"resnet20"` with `num_classes >= 2` logits, and a jitted `init_params(key) -> params`
    (the `"params"` collection) for examples of shape `input_shape`, e.g. `(8, 8, 1)`."""
    if name not in MODELS:
        raise ValueError(f"name: got {name!r}; expected one of {', '.join(MODELS)}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes: got {num_classes!r}; expected an integer >= 2")
    input_shape = tuple(int(d) for d in input_shape)
    num_classes = int(num_classes)
    if name == "mlp":
        module = MLP(num_classes=num_classes)
    elif name == "cnn":
        module = SmallCNN(num_classes=num_classes)
    else:
        module = ResNet20(num_classes=num_classes)

    @jax.jit  # Compiling the initialisers once is faster than running them op by op.
    def init_params(key: jax.Array) -> Params:
        return module.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]

    return module, init_params


def num_params(params: Params) -> int:
    """Returns the number of scalar parameters in a pytree."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def classification_loss(
    module: nn.Module,
) -> Callable[[Params, Batch], tuple[jax.Array, dict[str, jax.Array]]]:
    """`loss_fn(params, {"x", "y"}) -> (mean softmax cross-entropy, {"accuracy": ...})`
    of a classifier (use it with `has_aux=True`)."""

    def loss_fn(params: Params, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = module.apply({"params": params}, batch["x"])
        labels = batch["y"]
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))
        return loss, {"accuracy": accuracy}

    return loss_fn


def make_eval_fn(
    module: nn.Module, batch_size: int = 1000
) -> Callable[[Params, Any, Any], tuple[float, float]]:
    """`eval_fn(params, x, y) -> (mean loss, accuracy)` over a whole dataset, as floats.

    Chunks of `batch_size` (>= 1) examples, the last one padded and masked, go
    through one jitted function: bounded memory, one compilation per input shape.
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}; expected an integer >= 1")
    batch_size = int(batch_size)

    @jax.jit
    def chunk_sums(params: Params, x: jax.Array, y: jax.Array, mask: jax.Array):
        logits = module.apply({"params": params}, x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(jnp.where(mask, correct, 0.0))

    def eval_fn(params: Params, x: Any, y: Any) -> tuple[float, float]:
        x, y = np.asarray(x), np.asarray(y)
        n = y.shape[0]
        if n == 0 or x.shape[0] != n:
            raise ValueError(
                f"x, y: got shapes {x.shape} and {y.shape}; expected [n, ...] and [n] with n >= 1"
            )
        size = min(batch_size, n)
        loss_sum, correct_sum = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        for start in range(0, n, size):
            xs, ys = x[start : start + size], y[start : start + size]
            valid = ys.shape[0]
            if valid < size:
                pad = size - valid
                xs = np.concatenate([xs, np.zeros((pad, *xs.shape[1:]), xs.dtype)])
                ys = np.concatenate([ys, np.zeros((pad,), ys.dtype)])
            mask = np.arange(size) < valid
            loss_part, correct_part = chunk_sums(params, xs, ys, mask)
            loss_sum, correct_sum = loss_sum + loss_part, correct_sum + correct_part
        return float(loss_sum) / n, float(correct_sum) / n  # One device fetch per call.

    return eval_fn


def evaluate(
    module: nn.Module, params: Params, x: Any, y: Any, batch_size: int = 1000
) -> tuple[float, float]:
    """`make_eval_fn(module, batch_size)(params, x, y)`, the evaluator cached per module."""
    return _cached_eval_fn(module, batch_size)(params, x, y)


@functools.lru_cache(maxsize=32)
def _cached_eval_fn(module: nn.Module, batch_size: int) -> Callable:
    return make_eval_fn(module, batch_size)
