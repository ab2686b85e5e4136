"""Elastic consistency constants `B` (docs/theory.md section 5), one function per variant.

Each function returns `B` such that `||x_t - v_t^p|| <= eta * B` on every
realisation (or in expectation, where said) under the semantics of docs/theory.md,
given `m` (a bound `M` on stochastic gradient norms, e.g. the running maximum
`m_hat` or a clipping norm) or `mu` (a bound on `||C(eta g)|| / eta` for
compressed updates without error feedback). The arguments may be Python
numbers or JAX arrays (the algorithms call these inside `jit`).

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


def sync_sgd(*, m, delta=None, error_feedback=0.0):
    """`B` for synchronous SGD, with or without compression and error feedback.

    Without error feedback every worker's view is the model itself
    (`v^p = X = x`), so `B = 0`, compressed or not (a biased compressor
    changes the convergence rate, not `B`: docs/theory.md section 3). With error
    feedback the views are the actual model `X` and the auxiliary model is the
    virtual iterate `x = X - (1/P) sum_p e^p`, so
    `||x - v^p|| = ||mean_p e^p|| <= max_p ||e^p|| <= eta M rho`:

        B = rho(beta, delta) * M.

    Args:
      m: the gradient norm bound `M`.
      delta: the compressor's contraction constant (needed with error feedback).
      error_feedback: the damping `beta` (0 or False: none; True: 1).
    """
    beta = float(error_feedback) if isinstance(error_feedback, bool) else error_feedback
    if isinstance(beta, float) and beta == 0.0:
        return 0.0 * m
    return rho(beta, delta) * m


def async_sgd(*, max_delay, num_workers, m=None, mu=None, delta=None, error_feedback=0.0):
    """`B` for asynchronous shared-memory SGD (consistent or inconsistent reads).

    Update `t` reads iterates at most `max_delay` updates old, so
    `x_t - v_t = -(sum of the <= max_delay applied updates the view missed)`;
    for inconsistent reads the same holds per coordinate, and the norm of the
    vector of per-coordinate sums is at most the sum of the norms. Each applied
    update has norm `<= eta M` uncompressed, `<= eta mu` compressed without
    error feedback:

        B = max_delay * M           (no compression)
        B = max_delay * mu          (compressed, no error feedback)

    With error feedback (per-worker residuals, the summed virtual iterate
    `x = X - sum_p e^p`), the view is a stale read of the actual model, so
    `x - v = -(missed applied updates) - sum_p e^p`; the updates have norm
    `<= eta M (1 + rho)` and each residual `<= eta M rho`:

        B = M * (max_delay * (1 + rho) + P * rho).

    Args:
      max_delay: the largest lag, counted in updates.
      num_workers: `P`.
      m: the gradient norm bound `M`.
      mu: the compressed-update bound `mu` (compression without error feedback).
      delta: the contraction constant (error feedback).
      error_feedback: the damping `beta` (0 or False: none; True: 1).
    """
    beta = float(error_feedback) if isinstance(error_feedback, bool) else error_feedback
    if isinstance(beta, float) and beta == 0.0:
        return max_delay * (m if mu is None else mu)
    r = rho(beta, delta)
    return m * (max_delay * (1.0 + r) + num_workers * r)


def message_passing_sgd(
    *, max_delay, num_workers, m=None, mu=None, delta=None, error_feedback=0.0, crashes=0,
    permanent_drops=False,
):
    """`B` for message-passing SGD with delays, retransmitted drops and crashes.

    A node applies its own message at once and every other node's message of
    round `s` before round `s + 1 + k`, `k <= max_delay`; messages are weighted
    by `1 / n_s`, `n_s` the nodes alive at the start of round `s`. At round `r`
    node `q` misses at most the messages of the last `max_delay` rounds from
    the `n_s - 1` other nodes, each of norm `<= eta * M_msg`, so
    `||x - v^q|| <= eta * max_delay * (1 - 1/n_s) * M_msg <= eta * max_delay *
    (1 - 1/P) * M_msg`. A retransmitted drop arrives at the latest allowed round,
    so it is a delay. `M_msg` is `M` uncompressed, `mu` compressed without
    error feedback, and `M (1 + rho)` under error feedback, where the virtual
    iterate also differs from the actual models by the averaged residual
    (`<= eta M rho`).

    Each of `f` crashes leaves at most one message (the crashing node's last),
    weighted by `1 / n_c` with `n_c >= P - f + 1` alive while the crash is in
    progress, missing at some surviving node forever:

        B = max_delay (1 - 1/P) M_msg  [+ rho M under EF]  +  f M_msg / (P - f + 1).

    Permanent drops have no bound: a dropped message is missing from its
    receiver's view forever while the auxiliary model counts it, and under
    persistent gradient noise `E ||x - v||^2` grows linearly in `t`; the
    function returns `inf`.

    Args:
      max_delay: the largest delay, in rounds.
      num_workers: `P`.
      m: the gradient norm bound `M`.
      mu: the compressed-update bound (compression without error feedback).
      delta: the contraction constant (error feedback).
      error_feedback: the damping `beta` (0 or False: none).
      crashes: the number of crashes `f` (`0 <= f < P`).
      permanent_drops: whether dropped messages are lost forever.
    """
    if permanent_drops:
        return float("inf")
    return _message_terms(max_delay, num_workers, m, mu, delta, error_feedback, crashes, 1.0, 1.0)


def _message_terms(max_delay, num_workers, m, mu, delta, error_feedback, crashes, eta_window,
                   eta_all):
    """The message-passing bound in distance units: each term times its own `etabar`."""
    beta = float(error_feedback) if isinstance(error_feedback, bool) else error_feedback
    ef = not (isinstance(beta, float) and beta == 0.0)
    if ef:
        r = rho(beta, delta)
        per_message, residual = m * (1.0 + r), r * m
        eta_delay = eta_all  # residuals carry old rates
    else:
        per_message, residual = (m if mu is None else mu), 0.0
        eta_delay = eta_window
    delay_term = max_delay * (1.0 - 1.0 / num_workers) * per_message * eta_delay
    crash_term = crashes * per_message / (num_workers - crashes + 1) * eta_all
    return delay_term + residual * eta_all + crash_term


def elastic_scheduling(*, max_outstanding, num_workers, m, mode="norm"):
    """`B` for elastic scheduling with at most `tau = max_outstanding` averages in flight.

    Norm-bounded mode: the node proceeds on its stale view, so
    `x - v^p = -eta * sum over the <= tau outstanding rounds s of gbar_s`, and
    `||gbar_s|| <= M`:  `B = tau M`.

    Variance-bounded mode: the node applies its own `g^p_s` in place of each
    outstanding average, so `x - v^p = -eta sum_s (gbar_s - g^p_s)` with
    `gbar - g^p = (1/P) sum_{q != p} (g^q - g^p)`, each term `<= 2M`:
    `B = 2 tau M (1 - 1/P)`. In expectation, with every delay at `tau` and
    small `L eta`, `E ||x - v||^2 ~ eta^2 tau sigma^2 (1 - 1/P)`.
    """
    if mode == "norm":
        return max_outstanding * m
    return 2.0 * max_outstanding * m * (1.0 - 1.0 / num_workers)


def local_sgd(*, period, num_workers, m):
    """`B` for local SGD averaging every `H = period` rounds.

    Between synchronisations node `p`'s model and the average differ by
    `x - v^p = eta * sum_{j since sync} (g^p_j - gbar_j)`, at most `H - 1`
    terms, each `||g^p - gbar|| = ||(1 - 1/P) g^p - (1/P) sum_{q != p} g^q||
    <= 2 M (1 - 1/P)`:  `B = 2 (H - 1) M (1 - 1/P)`.
    """
    return 2.0 * (period - 1) * m * (1.0 - 1.0 / num_workers)
