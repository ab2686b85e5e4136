"""Elastic consistency constants `B` (docs/theory.md section 5), one function per variant.

Each function returns `B` such that `||x_t - v_t^p|| <= eta * B` on every
realisation (or in expectation, where the chain's bound is one) under the
semantics of docs/theory.md, from two bounds the per-worker chain provides
(`ej.chain`, `Rule.bounds`):

- `update`: `U`, a bound on `||u|| / eta` for every applied update: `M` (a
  bound on gradient norms: the running maximum `m_hat`, or a clipping norm)
  for plain SGD; the measured maximum `mu` of compressed updates without error
  feedback; `M (1 + rho)` under EF14 (`error_feedback`); the measured `u_hat`
  for any other rule;
- `residual`: `R`, a bound on `||e|| / eta` for what a worker holds back:
  `rho M` under EF14, else 0.

The arguments may be Python numbers or JAX arrays (the algorithms call these
inside `jit`).

References:
  G. Nadiradze, I. Markov, B. Chatterjee, V. Kungurtsev, D. Alistarh,
  "Elastic Consistency", arXiv:2001.05918.
"""

from __future__ import annotations


def rho(beta, delta):
    """The residual factor of error feedback around a contraction.

    With `q = sqrt(1 - delta)` (`||a - C(a)|| <= q ||a||`) and damping `beta`,
    the residual `e <- beta (a - C(a))`, `a = e + eta g`, satisfies by
    induction `||e|| <= beta q (||e|| + eta M)`, hence

        ||e|| <= eta * M * rho,    rho = beta q / (1 - beta q),

    and `||C(a)|| <= ||a|| <= eta M (1 + rho)` (docs/theory.md section 4).
    """
    q = (1.0 - delta) ** 0.5
    return beta * q / (1.0 - beta * q)


def error_feedback(*, m, delta, beta=1.0):
    """`(update, residual)` of EF14 around a contraction: `(M (1 + rho), M rho)`."""
    r = rho(beta, delta)
    return m * (1.0 + r), m * r


def sync_sgd(*, residual=0.0):
    """`B` for synchronous SGD: `R`.

    Every view is the actual model `X` and the auxiliary model is `X` minus the
    mean of what the workers hold back, so `||x - v^p|| = ||mean_p e^p|| <=
    max_p ||e^p|| <= eta R`: 0 without error feedback (compressed or not: a
    biased compressor changes the convergence rate, not `B`, docs/theory.md
    section 3), `rho M` with EF14.
    """
    return residual


def async_sgd(*, max_delay, num_workers, update, residual=0.0):
    """`B` for asynchronous shared-memory SGD (consistent or inconsistent reads).

    Update `t` reads iterates at most `max_delay` updates old, so
    `x_t - v_t = -(sum of the <= max_delay applied updates the view missed)`
    `- sum_p e^p` (the residuals, under EF14); for inconsistent reads the same
    holds per coordinate, and the norm of the vector of per-coordinate sums is
    at most the sum of the norms:

        B = max_delay * U + P * R

    (`max_delay M` for plain SGD, `max_delay mu` compressed without error
    feedback, `M (max_delay (1 + rho) + P rho)` with EF14).
    """
    return max_delay * update + num_workers * residual


def message_passing_sgd(*, max_delay, num_workers, update, residual=0.0, crashes=0,
                        permanent_drops=False):
    """`B` for message-passing SGD with delays, retransmitted drops and crashes.

    A node applies its own message at once and every other node's message of
    round `s` before round `s + 1 + k`, `k <= max_delay`; messages are weighted
    by `1 / n_s`, `n_s` the nodes alive at the start of round `s`. At round `r`
    node `q` misses at most the messages of the last `max_delay` rounds from
    the `n_s - 1` other nodes, each of norm `<= eta U`, so `||x - v^q|| <=
    eta max_delay (1 - 1/P) U`; a retransmitted drop arrives at the latest
    allowed round, so it is a delay. Under EF14 the virtual iterate also
    differs from the nodes' models by the averaged residual (`<= eta R`). Each
    of `f` crashes leaves at most one message (the crashing node's last),
    weighted by `1 / n_c` with `n_c >= P - f + 1` alive while the crash is in
    progress, missing at some surviving node forever:

        B = max_delay (1 - 1/P) U + R + f U / (P - f + 1).

    Permanent drops have no bound: a dropped message is missing from its
    receiver's view forever while the auxiliary model counts it, and under
    persistent gradient noise `E ||x - v||^2` grows linearly in `t`; the
    function returns `inf`.
    """
    if permanent_drops:
        return float("inf")
    return message_terms(max_delay, num_workers, update, residual, crashes, 1.0, 1.0)


def message_terms(max_delay, num_workers, update, residual, crashes, eta_window, eta_all):
    """The message-passing bound in distance units: each term times its own `etabar`.

    `eta_window` is the largest rate of the last `max_delay` rounds (the
    delayed messages'), `eta_all` that of the whole run (residuals and lost
    messages carry old rates).
    """
    delay_term = max_delay * (1.0 - 1.0 / num_workers) * update * eta_window
    crash_term = crashes * update / (num_workers - crashes + 1) * eta_all
    return delay_term + residual * eta_all + crash_term


def elastic_scheduling(*, max_outstanding, num_workers, update, mode="norm"):
    """`B` for elastic scheduling with at most `tau = max_outstanding` averages in flight.

    Norm-bounded mode: the node proceeds on its stale view, so
    `x - v^p = -sum over the <= tau outstanding rounds s of ubar_s`, and
    `||ubar_s|| <= eta U`:  `B = tau U`.

    Variance-bounded mode: the node applies its own `u^p_s` in place of each
    outstanding average, so `x - v^p = -sum_s (ubar_s - u^p_s)` with
    `ubar - u^p = (1/P) sum_{q != p} (u^q - u^p)`, each term `<= 2 eta U`:
    `B = 2 tau U (1 - 1/P)`. In expectation, with every delay at `tau` and
    small `L eta`, `E ||x - v||^2 ~ eta^2 tau sigma^2 (1 - 1/P)`.
    """
    if mode == "norm":
        return max_outstanding * update
    return 2.0 * max_outstanding * update * (1.0 - 1.0 / num_workers)


def local_sgd(*, period, num_workers, update):
    """`B` for local SGD averaging every `H = period` rounds.

    Between synchronisations node `p`'s model and the average differ by
    `x - v^p = sum_{j since sync} (u^p_j - ubar_j)`, at most `H - 1` terms,
    each `||u^p - ubar|| = ||(1 - 1/P) u^p - (1/P) sum_{q != p} u^q||
    <= 2 eta U (1 - 1/P)`:  `B = 2 (H - 1) U (1 - 1/P)`.
    """
    return 2.0 * (period - 1) * update * (1.0 - 1.0 / num_workers)


def gossip_sgd(*, factor, update, residual=0.0):
    """`B` for gossip SGD: `factor U + R`, `factor` the topology's consensus constant.

    Starting from consensus, the nodes' disagreement is
    `X_t (I - J) = -sum_{s<t} U_s (W_s ... W_{t-1} - J)` (`W_r = I` on rounds
    that do not mix), so node `i`'s distance from the mean is at most
    `eta U sum_{s<t} ||(W_s ... W_{t-1} - J) e_i||_1`; `factor` is the supremum
    over `t` and `i` of that sum (`ej.topologies.consensus_factor`, exact:
    an adversarial sequence of updates of norm `eta U` reaches it). Under EF14
    the auxiliary model is the mean minus the mean residual (`<= eta R`):

        B = factor U + R.

    With `W = J` and `H` rounds per mixing, `factor = 2 (H - 1)(1 - 1/P)`:
    local SGD's bound.
    """
    return factor * update + residual


def diloco(*, period, num_workers, update, residual=0.0):
    """`B` for DiLoCo with `H = period` inner steps per outer step (`ej.diloco`).

    The views are the local models and the auxiliary model is their mean minus
    the mean residual `ebar` of the outer error feedback, `x = mean_q v^q - ebar`.
    Right after a fragment's synchronisation every node holds the global model,
    so for each fragment `x - v^p` is the residual's part plus the local steps
    since its synchronisation, at most `H - 1` of them (any `H` consecutive
    rounds synchronise every fragment once), each `||u^p - ubar|| <= 2 eta U
    (1 - 1/P)` on the fragment's coordinates and so on the whole model: local
    SGD's bound plus `R`,

        B = 2 (H - 1)(1 - 1/P) U + R.

    The outer optimizer moves the global model, not the distance: after its
    step every view is the new global model and `x` is reset to it minus the
    new mean residual (docs/theory.md section 12).
    """
    return local_sgd(period=period, num_workers=num_workers, update=update) + residual


def diloco_residual(*, period, update, rho):
    """`R = rho H U` for DiLoCo's outer error feedback around a contraction.

    A node's pseudo-gradient sums at most `H` inner updates, `||Delta^p|| <=
    eta H U`, and error feedback around a contraction of factor `q` keeps
    `||e|| <= q (||e|| + ||Delta||)`, so `||e|| <= eta rho H U` with section 4's
    `rho` (`bounds.rho`); per fragment with its own `rho_f`, and over `F`
    fragments (disjoint coordinates) `rho = sqrt(sum_f rho_f^2)`.
    """
    return rho * period * update
