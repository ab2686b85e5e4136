"""The per-worker update rule as a chain of links, and what it tells the bounds.

Every algorithm takes one `Rule`: a chain of links (`elastic_jax.links`) that
turns each worker's gradient `g` into the update `u` it sends, e.g.

    ej.chain(ej.clip(1.0), ej.sgd(), ej.error_feedback(ej.top_k(fraction=0.01)))

The chain's state is each link's state, stacked on the worker axis by the
algorithm. The chain also answers, from its links' static facts, what the
consistency bounds need (`Rule.bounds`): a bound `U` on `||u|| / eta` (derived
link by link from the bound `M` on gradient norms, or the measured running
maximum `u_hat` where a link's output norm is not known), a bound `R` on what
the links hold back (EF14's residual), the bits a message puts on the wire, and
whether the bound holds on every realisation or in expectation.

The factories' `compressor=`, `error_feedback=` and `clip_norm=` arguments
build the chain `[clip] + sgd + [compressor or error feedback]` (`resolve`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elastic_jax import compressors as compressors_lib
from elastic_jax import consistency, validation
from elastic_jax import error_feedback as error_feedback_lib
from elastic_jax import powersgd as powersgd_lib
from elastic_jax.links import Context, Link, clip, compress
from elastic_jax.optimizers import raw_gradient, sgd

_COLLECTIVE = ("a per-worker link: ej.powersgd is a collective compressor, defined for "
               "sync_sgd (compressor=) and diloco (outer_compressor=) only")
_EXPECTED = ("links such as ej.clip(1.0), ej.weight_decay(1e-4), ej.sgd(momentum=0.9), "
             "ej.adamw(), ej.top_k(...), ej.error_feedback(...), ej.ef21(...)")


class Sent(NamedTuple):
    """What one worker's chain produced in a round (the core of every message)."""

    update: Any  # pytree like params: u, what the worker sends or writes
    pending: Any  # pytree or None: what the chain held back before the round
    pending_after: Any  # pytree or None: ... and after it
    grad_norm: jax.Array  # [] ||g||, the gradient as the base optimizer receives it
    update_norm: jax.Array  # [] ||u||
    pending_norm: jax.Array  # [] ||pending|| after the round (0 when nothing is held back)
    aux: dict  # per-worker scalars the links report


def as_link(item) -> Link:
    """A link from a link, a bare compressor or an `ej.error_feedback(...)` value."""
    if isinstance(item, Link):
        return item
    if powersgd_lib.is_powersgd(item):
        validation.fail("rule", item, _COLLECTIVE)
    if isinstance(item, compressors_lib.Compressor):
        if item.spec.name == "error_feedback":
            return error_feedback_lib.link(item)
        return compress(item)
    return validation.fail("rule", item, _EXPECTED)


class Rule(NamedTuple):
    """A validated chain of links (build it with `ej.chain`)."""

    links: tuple[Link, ...]

    def __repr__(self) -> str:
        return "ej.chain(" + ", ".join(map(repr, self.links)) + ")"

    @property
    def compressor(self):
        """The compressor whose output goes on the wire, or None (dense)."""
        found = [link.facts.compressor for link in self.links if link.facts.compressor]
        return found[0] if found else None

    @property
    def holds_back(self) -> bool:
        """Whether a link holds part of the update back (the virtual iterate differs)."""
        return any(link.facts.pending is not None for link in self.links)

    @property
    def bound_kind(self) -> str:
        kinds = {link.facts.bound_kind for link in self.links}
        return "expectation" if "expectation" in kinds else "deterministic"

    def check(self, variant: str, *, compression: bool = True) -> None:
        """Refuses links that `variant` does not support (one line naming `rule`)."""
        for link in self.links:
            allowed = link.facts.variants
            if allowed is not None and variant not in allowed:
                validation.fail("rule", self, f"links defined for {variant}: {link!r} is "
                                f"defined for {', '.join(allowed)} only")
            if not compression and (link.facts.compressor or link.facts.pending):
                validation.fail("rule", self, f"an uncompressed chain: {variant} sends dense "
                                f"updates (got {link!r})")

    def validate(self, params) -> None:
        """Checks the compressor against `params` (shapes only; compiles nothing)."""
        if self.compressor is not None:
            compressors_lib.compression_info(self.compressor, params)

    def bits(self, params) -> int:
        """Bits one message of one worker puts on the wire (docs/theory.md section 7)."""
        if self.compressor is None:
            return compressors_lib.BITS_PER_VALUE * sum(x.size for x in jax.tree.leaves(params))
        return compressors_lib.compression_info(self.compressor, params).bits

    def init(self, params, num_workers: int):
        """The chain state of `num_workers` workers, stacked on a leading axis."""
        one = tuple(link.init(params) for link in self.links)
        return jax.tree.map(
            lambda x: jnp.broadcast_to(x, (num_workers,) + jnp.shape(x)).copy(), one)

    def pending(self, state):
        """What the links of one worker's chain (or of all, stacked) hold back, or None."""
        parts = [link.facts.pending(s) for link, s in zip(self.links, state, strict=True)
                 if link.facts.pending is not None]
        if not parts:
            return None
        return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *parts)

    def apply(self, grad, state, learning_rate, key, view) -> tuple[Sent, Any]:
        """One worker's round: its gradient through every link, in order."""
        tree, new_state, aux = grad, [], {}
        for position, (link, link_state) in enumerate(zip(self.links, state, strict=True)):
            if link.facts.stage == "optimizer":
                grad_norm = consistency.tree_norm(tree)
            link_key = jax.random.fold_in(key, position) if link.facts.stochastic else None
            tree, link_state, link_aux = link.update(
                tree, link_state, Context(learning_rate, link_key, view))
            new_state.append(link_state)
            aux.update(link_aux)
        new_state = tuple(new_state)
        pending_after = self.pending(new_state)
        sent = Sent(
            update=tree,
            pending=self.pending(state),
            pending_after=pending_after,
            grad_norm=grad_norm,
            update_norm=consistency.tree_norm(tree),
            pending_norm=(jnp.zeros_like(grad_norm) if pending_after is None
                          else consistency.tree_norm(pending_after)),
            aux=aux,
        )
        return sent, new_state

    @property
    def optimizer_at(self) -> int:
        """The position of the base optimizer link."""
        return [link.facts.stage for link in self.links].index("optimizer")

    def placed(self, placement: str) -> tuple[Rule, Link | None]:
        """`(the workers' chain, the server's optimizer)` under an optimizer placement.

        `"worker"`: the chain itself, and no server optimizer (each worker keeps
        its optimizer state). `"server"`: the chain with its base optimizer
        replaced by the raw gradient (`u = g`, so compression and error
        feedback act on the gradient and their bounds are in gradient units),
        and that base optimizer, which `combine` applies once to the mean of the
        workers' outputs (docs/theory.md section 9).
        """
        if placement == "worker":
            return self, None
        at = self.optimizer_at
        return Rule(self.links[:at] + (raw_gradient(),) + self.links[at + 1:]), self.links[at]

    def gradient_bound(self, m_hat, params):
        """`M`, the bound on the base optimizer's input norms.

        Known before the run where the gradient links bound their output
        (clipping: `C`), else the measured running maximum `m_hat`.
        """
        bound = None
        for link in self.links[:self.optimizer_at]:
            bound = link.facts.out_bound(bound, params)
        return m_hat if bound is None else bound

    def bounds(self, m_hat, u_hat, params):
        """`(U, R)`: the bounds the chain gives on `||u|| / eta` and `||pending|| / eta`.

        From `M = gradient_bound(m_hat)` at the base optimizer's input, each
        later link moves the bound (`Facts.out_bound`); where a link does not
        know its output's norm, `U` is the measured running maximum `u_hat`.
        `R` bounds what the links hold back (0 when nothing is; `inf` when a
        link holding back cannot bound it).
        """
        bound, residual = self.gradient_bound(m_hat, params), 0.0
        for link in self.links[self.optimizer_at:]:
            if link.facts.residual_bound is not None:
                held = link.facts.residual_bound(bound, params)
                residual = residual + (jnp.inf if held is None else held)
            bound = link.facts.out_bound(bound, params)
        return (u_hat if bound is None else bound), residual

    def measures_update(self, params) -> bool:
        """Whether `bounds` reads the measured `u_hat` (a link does not bound its output's
        norm): only then do the variants compute the workers' update norms."""
        return self.bounds(1.0, None, params)[0] is None

    def metrics(self, aux, params) -> dict:
        """The links' own metrics from their per-worker `aux` (maximised over workers)."""
        out = {}
        for link in self.links:
            if link.facts.metrics is not None:
                out.update(link.facts.metrics({k: jnp.max(v) for k, v in aux.items()}, params))
        return out


def chain(*links) -> Rule:
    """The per-worker update rule: `links` applied to each worker's gradient in order.

    Exactly one base optimizer (`ej.sgd(...)`, `ej.adamw(...)`,
    `ej.from_optax(tx)`), gradient links (`ej.clip`, `ej.weight_decay`,
    `ej.ef21`) before it, update links (a compressor, `ej.error_feedback`)
    after it, at most one link that compresses. A bare compressor stands for
    compression without error feedback.

    Example:
      >>> rule = ej.chain(ej.clip(1.0), ej.sgd(), ej.error_feedback(ej.top_k(fraction=0.01)))
      >>> alg = ej.async_sgd(0.05, 8, max_delay=8, rule=rule)
    """
    links = tuple(as_link(item) for item in links)
    rule = Rule(links)
    stages = [link.facts.stage for link in links]
    if stages.count("optimizer") != 1:
        validation.fail("rule", rule, "exactly one base optimizer link, e.g. ej.sgd() or "
                        "ej.adamw()")
    at = stages.index("optimizer")
    for i, link in enumerate(links):
        if (i < at and link.facts.stage == "update") or (i > at and link.facts.stage == "gradient"):
            where = "before" if link.facts.stage == "gradient" else "after"
            validation.fail("rule", rule, f"{link!r} {where} the base optimizer")
    if sum(link.facts.compressor is not None for link in links) > 1:
        validation.fail("rule", rule, "at most one link that compresses")
    return rule


def resolve(rule, compressor, error_feedback, clip_norm, variant: str, *,
            compression: bool = True) -> Rule:
    """The algorithm's chain: `rule`, or the one its keyword arguments describe.

    `compressor=C` is `chain(sgd(), C)`; with `error_feedback=True` or a
    float `beta` it is `chain(sgd(), ej.error_feedback(C or identity, beta))`;
    `clip_norm=c` puts `clip(c)` first. `rule` and those arguments are
    exclusive.
    """
    if powersgd_lib.is_powersgd(compressor):
        validation.fail("compressor", compressor, f"a per-worker compressor for {variant}: "
                        "ej.powersgd is a collective compressor, defined for sync_sgd and "
                        "diloco (outer_compressor=) only")
    beta = validation.check_beta(error_feedback)
    validation.check_clip_norm(clip_norm)
    if rule is not None:
        for name, value, unset in (("compressor", compressor, compressor is None),
                                   ("error_feedback", error_feedback, beta is None),
                                   ("clip_norm", clip_norm, clip_norm is None)):
            if not unset:
                validation.fail(name, value, "the default with rule= (put it in the chain)")
        if not isinstance(rule, Rule):
            validation.fail("rule", rule, "a chain built by ej.chain(...)")
    else:
        if compressor is not None:
            if not isinstance(compressor, compressors_lib.Compressor):
                validation.fail("compressor", compressor, "a compressor such as ej.top_k(...)")
            if compressor.spec.name == "error_feedback":
                validation.fail(
                    "compressor", validation.Text("a compressor already wrapped by "
                                                  "ej.error_feedback"),
                    "a bare compressor; pass error_feedback=True or a float beta instead")
        links = [clip(clip_norm)] if clip_norm is not None else []
        links.append(sgd())
        if beta is not None:
            links.append(error_feedback_lib.error_feedback(
                compressor or compressors_lib.identity(), beta=beta))
        elif compressor is not None:
            links.append(compressor)
        rule = chain(*links)
    rule.check(variant, compression=compression)
    return rule
