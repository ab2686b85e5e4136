"""Elastic consistency constants `B` (THEORY.md section 5), one function per variant.

Each function returns `B` such that `||x_t - v_t^p|| <= eta * B` on every
realisation (or in expectation, where said) under the semantics of THEORY.md,
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

    and `||C(a)|| <= ||a|| <= eta M (1 + rho)` (THEORY.md section 4).
    """
    q = (1.0 - delta) ** 0.5
    return beta * q / (1.0 - beta * q)


def sync_sgd(*, m, delta=None, error_feedback=0.0):
    """`B` for synchronous SGD, with or without compression and error feedback.

    Without error feedback every worker's view is the model itself
    (`v^p = X = x`), so `B = 0`, compressed or not (a biased compressor
    changes the convergence rate, not `B`: THEORY.md section 3). With error
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
