"""Mixing matrices of decentralized (gossip) SGD: topologies, validation, spectra, exact bound.

Convention (docs/theory.md section 10): the `P` nodes' models are the columns of
`X` (`d x P`), and a mixing round is `X <- X W`: node `i` takes
`sum_j W[j, i] x_j`. `W` is doubly stochastic and non-negative, so the mean of
the models is unchanged by mixing. A topology is a *schedule* of matrices
`W_0, ..., W_{T-1}`, the `k`-th mixing round using `W_{k mod T}`; random
matching draws its matrix every mixing round instead.

Named topologies and their weights (period: matrices before the schedule repeats):

- `"ring"`: `(I + S + S^-1) / 3`, self and both neighbours 1/3 each (period 1);
- `"torus"`: `(I + S_r + S_r^-1 + S_c + S_c^-1) / 5` on a `rows x cols` grid
  (`torus_shape`), self and the 4 grid neighbours 1/5 each (period 1);
- `"hypercube"`: self and the `n = log2 P` nodes `i XOR 2^k`, `1 / (n + 1)` each,
  `P` a power of two (period 1);
- `"exponential"`: self and nodes `i + 2^k`, `k < n = ceil(log2 P)`, `1 / (n + 1)`
  each (period 1);
- `"one_peer_exponential"`: `W_t = (I + S^(2^t)) / 2`, `t < tau = ceil(log2 P)`
  (period `tau`);
- `"random_matching"`: `(I + Pi) / 2`, `Pi` a uniformly random perfect matching
  drawn every mixing round (one node idle for odd `P`);
- `"star"`: node 0 the hub, Metropolis weights `W[0, j] = W[j, 0] = 1/P`,
  `W[j, j] = 1 - 1/P` (period 1);
- `"complete"`: `J = 11^T / P` (period 1).

`S` is the cyclic shift `S[(i + 1) mod P, i] = 1` (node `i` receives from node
`i + 1`). Any other schedule is a user matrix `[P, P]` or a sequence `[T, P, P]`.

This module is NumPy only, in float64: the algorithm (`ej.gossip_sgd`) reads
`neighbours` to mix inside its program, and `consensus_factor` and `gaps`
once, before the run.

References:
  A. Koloskova, N. Loizou, S. Boreiri, M. Jaggi, S. Stich, "A Unified Theory of
  Decentralized SGD with Changing Topology and Local Updates", arXiv:2003.10422.
  B. Ying, K. Yuan, Y. Chen, H. Hu, P. Pan, W. Yin, "Exponential Graph is
  Provably Efficient for Decentralized Deep Training", arXiv:2110.13363.
  S. Boyd, P. Diaconis, L. Xiao, "Fastest Mixing Markov Chain on a Graph",
  SIAM Review 46(4), 2004 (Metropolis weights).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from elastic_jax import validation

NAMES = ("ring", "torus", "hypercube", "exponential", "one_peer_exponential", "random_matching",
         "star", "complete")
# Rows and columns of a user matrix must sum to 1 within this (float64).
TOLERANCE = 1e-9
# A schedule whose period product is this close to a non-contraction has no finite bound.
CONTRACTION_LIMIT = 1.0 - 1e-12
# `consensus_factor` stops when the tail adds less than this, relative.
RTOL = 1e-9
# ... or after this many float64 operations (the value is then a valid, looser bound).
MAX_WORK = 2e9

_EXPECTED = ("one of " + ", ".join(repr(n) for n in NAMES) + ", or a doubly stochastic matrix "
             "[P, P] or a sequence of them [T, P, P] (non-negative, rows and columns summing to "
             "1 within 1e-9)")


class Mixing(NamedTuple):
    """A validated mixing schedule of `num_workers` nodes.

    Attributes:
      name: the topology's name, or `"matrix"` for a user schedule.
      num_workers: `P`.
      matrices: `(W_0, ..., W_{T-1})`, float64 `[P, P]` arrays, the `k`-th mixing
        round using `W_{k mod T}`; None for random matching (drawn per round).
      finite: whether a finite deterministic consensus bound exists: every named
        deterministic topology is connected with positive self-weights, so its
        period product contracts (`contraction < 1`); random matching has none
        (repeating one matching mixes nothing more); a user schedule has one iff
        `contraction(...) < CONTRACTION_LIMIT`.
    """

    name: str
    num_workers: int
    matrices: tuple[np.ndarray, ...] | None
    finite: bool

    @property
    def period(self) -> int:
        return 1 if self.matrices is None else len(self.matrices)


def _shift(num_workers: int, offset: int) -> np.ndarray:
    """`S^offset`: node `i` receives from node `i + offset` (`W[(i + offset) mod P, i] = 1`)."""
    out = np.zeros((num_workers, num_workers))
    nodes = np.arange(num_workers)
    out[(nodes + offset) % num_workers, nodes] = 1.0
    return out


def _log2_ceil(num_workers: int) -> int:
    return (num_workers - 1).bit_length()


def ring(num_workers: int) -> np.ndarray:
    """The lazy ring `(I + S + S^-1) / 3` (for `P = 2`: `(I + 2 S) / 3`)."""
    p = num_workers
    return (np.eye(p) + _shift(p, 1) + _shift(p, -1)) / 3.0


def torus_shape(num_workers: int) -> tuple[int, int]:
    """`(rows, cols)` of the torus: `rows` the largest divisor of `P` at most `sqrt(P)`."""
    rows = max(r for r in range(1, math.isqrt(num_workers) + 1) if num_workers % r == 0)
    return rows, num_workers // rows


def torus(num_workers: int) -> np.ndarray:
    """The 2-D torus on `torus_shape(P)`: self and the 4 grid neighbours, 1/5 each.

    Node `i` sits at row `i // cols`, column `i % cols`; a dimension of size 1 or
    2 counts its coinciding neighbours twice (the weights stay 1/5 per edge).
    """
    rows, cols = torus_shape(num_workers)
    nodes = np.arange(num_workers)
    r, c = nodes // cols, nodes % cols
    out = np.eye(num_workers)
    for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        out[((r + dr) % rows) * cols + (c + dc) % cols, nodes] += 1.0
    return out / 5.0


def hypercube(num_workers: int) -> np.ndarray:
    """Self and the nodes `i XOR 2^k`, `k < log2 P`, each `1 / (log2 P + 1)` (`P = 2^n`)."""
    n = _log2_ceil(num_workers)
    nodes = np.arange(num_workers)
    out = np.eye(num_workers)
    for k in range(n):
        out[nodes ^ (1 << k), nodes] += 1.0
    return out / (n + 1)


def exponential(num_workers: int) -> np.ndarray:
    """The static exponential graph: self and nodes `i + 2^k`, `k < ceil(log2 P)`, equal weights."""
    n = _log2_ceil(num_workers)
    return sum((_shift(num_workers, 1 << k) for k in range(n)), np.eye(num_workers)) / (n + 1)


def one_peer_exponential(num_workers: int) -> tuple[np.ndarray, ...]:
    """`W_t = (I + S^(2^t)) / 2` for `t < tau = ceil(log2 P)` (`(I,)` for `P = 1`).

    For `P` a power of two the product of any `tau` consecutive matrices is
    `J`: exact averaging every `tau` rounds.
    """
    tau = _log2_ceil(num_workers)
    if tau == 0:
        return (np.eye(num_workers),)
    return tuple((np.eye(num_workers) + _shift(num_workers, 1 << t)) / 2.0 for t in range(tau))


def star(num_workers: int) -> np.ndarray:
    """Node 0 the hub, Metropolis weights: `W[0, j] = W[j, 0] = 1/P`, `W[j, j] = 1 - 1/P`."""
    p = num_workers
    out = np.eye(p) * (1.0 - 1.0 / p)
    out[0, :] = out[:, 0] = 1.0 / p
    return out


def complete(num_workers: int) -> np.ndarray:
    """`J = 11^T / P`: every node takes the mean."""
    return np.full((num_workers, num_workers), 1.0 / num_workers)


def expected_matching(num_workers: int) -> np.ndarray:
    """`E W` of random matching: `(I + E Pi) / 2`.

    Each node is matched to each other node with probability `1 / (P - 1)` for
    even `P`; for odd `P` it is left idle with probability `1 / P` and matched to
    each other node with probability `1 / P`, so `E Pi = J`.
    """
    p = num_workers
    if p == 1:
        return np.eye(1)
    pi = complete(p) if p % 2 else (np.ones((p, p)) - np.eye(p)) / (p - 1)
    return (np.eye(p) + pi) / 2.0


_BUILDERS = {"ring": ring, "torus": torus, "hypercube": hypercube, "exponential": exponential,
             "star": star, "complete": complete}


def mixing(topology, num_workers: int) -> Mixing:
    """The validated schedule of `topology` for `num_workers` nodes.

    Args:
      topology: a name of `NAMES`, or a doubly stochastic matrix `[P, P]`, or a
        sequence of them (`[T, P, P]`), applied cyclically.
      num_workers: `P >= 1`.

    Returns:
      A `Mixing`.

    Raises:
      ValueError: one line naming `topology` and what fails (an unknown name,
        `'hypercube'` for `P` not a power of two, a shape, a non-finite or
        negative entry, or a row or column whose sum is not 1).

    Example:
      >>> ej.topologies.mixing("torus", 16).matrices[0][0, :5]
      array([0.2, 0.2, 0. , 0.2, 0.2])
    """
    p = validation.check_int("num_workers", num_workers, lo=1)
    if isinstance(topology, str):
        if topology not in NAMES:
            validation.fail("topology", topology, _EXPECTED)
        if topology == "hypercube" and p & (p - 1):
            validation.fail("topology", validation.Text(f"'hypercube' with num_workers={p}"),
                            "num_workers a power of two for 'hypercube'")
        if topology == "random_matching":
            return Mixing(topology, p, None, False)
        if topology == "one_peer_exponential":
            return Mixing(topology, p, one_peer_exponential(p), True)
        return Mixing(topology, p, (_BUILDERS[topology](p),), True)
    matrices = _check_matrices(topology, p)
    schedule = Mixing("matrix", p, matrices, True)
    return schedule._replace(finite=contraction(schedule) < CONTRACTION_LIMIT)


def _check_matrices(topology, p: int) -> tuple[np.ndarray, ...]:
    try:
        array = np.array(topology, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.dtype != np.float64:
        validation.fail("topology", validation.Text(type(topology).__name__), _EXPECTED)
    shape = array.shape
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1:] != (p, p):
        validation.fail("topology", validation.Text(f"a matrix of shape {shape}"),
                        f"[P, P] or [T, P, P] with P = num_workers = {p}")
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
        validation.fail("topology", validation.Text(f"a non-finite entry at {bad[0].tolist()}"),
                        "finite, non-negative entries")
    bad = np.argwhere(array < 0)
    if bad.size:
        validation.fail("topology", validation.Text(
            f"the entry {float(array[tuple(bad[0])])!r} at {bad[0].tolist()}"),
            "non-negative entries")
    for axis, what in ((2, "row"), (1, "column")):
        sums = array.sum(axis=axis)
        bad = np.argwhere(np.abs(sums - 1.0) > TOLERANCE)
        if bad.size:
            t, i = bad[0]
            validation.fail("topology", validation.Text(
                f"a matrix whose {what} {i} sums to {float(sums[t, i])!r} (matrix {t})"),
                "rows and columns summing to 1 within 1e-9 (doubly stochastic)")
    return tuple(np.ascontiguousarray(w) for w in array)


def degree(schedule: Mixing) -> int:
    """`deg`: the most other nodes one node sends its model to in a mixing round.

    Node `j`'s model goes to every node `i != j` with `W[j, i] > 0` (row `j`
    of `W`), so

        deg = max_k max_j #{i != j : W_k[j, i] > 0}

    over the schedule's matrices: every node's count on a regular topology
    (ring 2, torus 4 on a grid of at least 3 x 3, hypercube and exponential
    graph `ceil(log2 P)`, one-peer exponential 1, complete `P - 1`), the hub's
    (`P - 1`) on the star. A random matching sends to one partner (0 for one
    node). The simulated clock times a mixing round by it (`ej.clock.gossip`,
    docs/theory.md section 11).

    Args:
      schedule: a `Mixing` (`mixing(...)`).

    Returns:
      `deg`, an int in `[0, P - 1]`.

    Example:
      >>> ej.topologies.degree(ej.topologies.mixing("torus", 16))
      4

    References:
      X. Lian, C. Zhang, H. Zhang, C.-J. Hsieh, W. Zhang, J. Liu, "Can
      Decentralized Algorithms Outperform Centralized Algorithms?",
      arXiv:1705.09056.
    """
    if schedule.matrices is None:
        return min(1, schedule.num_workers - 1)
    others = ~np.eye(schedule.num_workers, dtype=bool)
    return max(int(np.max(np.sum((w > 0) & others, axis=1))) for w in schedule.matrices)


def neighbours(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's non-zeros as `(index [P, K], weights [P, K])`.

    Mixing is then `new_i = sum_k weights[i, k] x_{index[i, k]}`.
    Sources in increasing node order; rows with fewer than `K` (the largest
    degree, self included) are padded with `(i, 0.0)`.
    """
    p = matrix.shape[0]
    columns = [np.flatnonzero(matrix[:, i]) for i in range(p)]
    width = max(len(c) for c in columns)
    index = np.tile(np.arange(p)[:, None], (1, width)).astype(np.int32)
    weights = np.zeros((p, width))
    for i, sources in enumerate(columns):
        index[i, :len(sources)] = sources
        weights[i, :len(sources)] = matrix[sources, i]
    return index, weights


def _period_products(schedule: Mixing) -> list[np.ndarray]:
    """`W_a W_{a+1} ... W_{a+T-1}` for each phase `a` (indices mod `T`)."""
    ws, t = schedule.matrices, schedule.period
    out = []
    for a in range(t):
        product = np.eye(schedule.num_workers)
        for j in range(t):
            product = product @ ws[(a + j) % t]
        out.append(product)
    return out


def contraction(schedule: Mixing) -> float:
    """`c = max_a ||W_a ... W_{a+T-1} - J||_2`: how much one period contracts the disagreement.

    For a static symmetric `W` this is `max(|lambda_2|, |lambda_P|)`; `c < 1` is
    needed for a finite bound (a non-lazy bipartite graph has `c = 1`). Random
    matching: 1 (no deterministic contraction).
    """
    if schedule.matrices is None:
        return 1.0
    j = complete(schedule.num_workers)
    return max(float(np.linalg.norm(q - j, 2)) for q in _period_products(schedule))


def gaps(schedule: Mixing) -> tuple[float, float]:
    """`(spectral_gap, norm_gap)` per mixing round.

    With `Phi` the product over one period (`T` mixing rounds; `Phi = W` for a
    static topology): `spectral_gap = 1 - |lambda_2(Phi)|^(1/T)`, `lambda_2` the
    eigenvalue of second largest real part (the largest, 1, belongs to the
    vector of ones), and `norm_gap = 1 - contraction^(1/T)`. They differ where
    `W` has an eigenvalue near -1 (a bipartite graph without self-weights: a
    positive spectral gap, a norm gap of 0). Random matching reports the gaps
    of `E W` (`expected_matching`, where `E W^T W = E W`). One node: `(1, 1)`.
    """
    if schedule.matrices is None:
        schedule = Mixing("expected", schedule.num_workers,
                          (expected_matching(schedule.num_workers),), True)
    t = schedule.period
    if schedule.num_workers == 1:
        return 1.0, 1.0
    eigenvalues = np.linalg.eigvals(_period_products(schedule)[0])
    second = float(np.abs(eigenvalues[np.argsort(-eigenvalues.real, kind="stable")][1]))
    # An eigenvalue that is 0 in exact arithmetic (exact averaging) is rounding here.
    second = 0.0 if second < 1e-12 else min(second, 1.0)
    spectral = 1.0 - second ** (1.0 / t)
    norm = 1.0 - min(contraction(schedule), 1.0) ** (1.0 / t)
    return spectral, norm


def consensus_factor(schedule: Mixing, local_steps: int = 1) -> float:
    """`B* / M`: the tight deterministic consensus constant of gossip SGD, in float64.

    From consensus, with `W_r = I` on rounds that do not mix (`H = local_steps`),
    `X_t (I - J) = -sum_{s<t} U_s (W_s ... W_{t-1} - J)`, so for updates of norm
    at most `eta M` (docs/theory.md section 10)

        B* = M sup_t max_i sum_{s<t} ||(W_s ... W_{t-1} - J) e_i||_1
           = M (2 (H - 1)(1 - 1/P) + H max_k max_i sum_{m>=1} ||(W_{k-m+1} ... W_k - J) e_i||_1)

    (the first term: the up to `H - 1` rounds since the last mixing, where the
    product is `I`; then each of the `H` rounds between two mixings sees the
    same product of the last `m` mixing matrices). The sum over `m` is
    computed term by term for each phase `k` until the tail bound

        sum_{m>N} ||(...) e_i||_1
            <= sqrt(P) ||(W_{k-N+1} ... W_k - J) e_i||_2 ((T - 1) + T c / (1 - c))

    (`c = contraction(schedule)`; `||v||_1 <= sqrt(P) ||v||_2`) adds less than
    `RTOL` relative, or after `MAX_WORK` operations; the tail bound is added,
    so the value is an upper bound on `B* / M`, equal to it within `RTOL` unless
    the work ran out (rings of hundreds of nodes). For a static `W` the tail
    bound from `N = 0` is the loose closed form `sqrt(P - 1) lambda / (1 - lambda)`.
    `inf` where `schedule.finite` is False.

    Args:
      schedule: a `Mixing`.
      local_steps: `H >= 1`, rounds per mixing round.

    Returns:
      The constant, a float (`inf`: no deterministic bound).

    Example:
      >>> round(ej.topologies.consensus_factor(ej.topologies.mixing("ring", 16)), 2)
      24.81
    """
    h = validation.check_int("local_steps", local_steps, lo=1)
    if not schedule.finite:
        return math.inf
    p, t = schedule.num_workers, schedule.period
    c = contraction(schedule)
    if c >= CONTRACTION_LIMIT:
        return math.inf
    j = complete(p)
    growth = (t - 1) + t * c / (1.0 - c)
    # `W @ Q` from the non-zeros of each row of `W` (the columns of `W^T`).
    rows = [neighbours(w.T) for w in schedule.matrices]
    width = max(index.shape[1] for index, _ in rows)
    max_steps = max(t, int(MAX_WORK / (width * p * p)))
    worst = 0.0
    for k in range(t):
        product, total = np.eye(p), np.zeros(p)
        for m in range(1, max_steps + 1):
            index, weights = rows[(k - m + 1) % t]
            product = np.einsum("jk,jkl->jl", weights, product[index])
            gap = product - j
            total += np.abs(gap).sum(axis=0)
            bounded = total + math.sqrt(p) * np.sqrt(np.square(gap).sum(axis=0)) * growth
            if bounded.max() <= (1.0 + RTOL) * total.max():
                break
        worst = max(worst, float(bounded.max()))
    return 2.0 * (h - 1) * (1.0 - 1.0 / p) + h * worst
