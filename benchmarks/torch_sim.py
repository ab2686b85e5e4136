"""An eager PyTorch simulation of the same configurations, for the speed comparison.

What someone would write without elastic_jax: a Python loop over workers, one
`torch.autograd.grad` per worker at its view, `torch.topk` for Top-k, a `deque`
of past parameter vectors for stale reads, per-worker residuals for error
feedback, buckets of delayed messages keyed by arrival round. Parameters live in
one flat vector (views are flat vectors too), so a view is a tensor and an
update is an `axpy`; the model is evaluated with `torch.func.functional_call`.
Every round also computes what elastic_jax reports for free: the mean loss and
the largest distance `||x - v^p||` between the auxiliary model and a view.

The semantics follow elastic_jax's round (docs/design.md, "The one abstraction";
docs/theory.md section 5) so the work per round is the same; the random draws
differ (PyTorch's generator), so trajectories are not compared.
"""

from __future__ import annotations

import collections
import math

import numpy as np

try:  # The [bench] extra: torch==2.13.0 (CPU build).
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # pragma: no cover - exercised where torch is absent
    torch = None

NOT_INSTALLED = "torch (the [bench] extra) is not installed"

SUPPORTED = ("sync", "sync_topk", "sync_topk_ef", "async_consistent", "async_inconsistent",
             "async_topk", "async_topk_ef", "message_passing", "elastic_scheduling",
             "local_sgd")


def available() -> tuple[bool, str]:
    """Whether the simulation can run here, and why not."""
    if torch is None:
        return False, f"{NOT_INSTALLED} (pip install torch==2.13.0)"
    return True, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def _module(model: str, num_classes: int = 10):
    if model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if model == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 8 * 8, num_classes))
    raise ValueError(f"model: got {model!r}; expected 'mlp' or 'cnn'")


class Simulation:
    """One configuration, simulated eagerly; `run(rounds)` advances it."""

    def __init__(self, model, variant, data, *, num_workers=8, max_delay=8, fraction=0.01,
                 batch_size=32, learning_rate=0.05, seed=0):
        if variant not in SUPPORTED:
            raise ValueError(f"variant: got {variant!r}; expected one of {SUPPORTED}")
        ok, why = available()
        if not ok:
            raise RuntimeError(why)
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.module = _module(model)
        self.names = [n for n, _ in self.module.named_parameters()]
        self.shapes = [p.shape for _, p in self.module.named_parameters()]
        self.sizes = [p.numel() for _, p in self.module.named_parameters()]
        self.d = sum(self.sizes)
        self.x = torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])
        images, labels, indices, counts = data
        self.images = torch.as_tensor(np.transpose(images, (0, 3, 1, 2)).copy())  # NCHW
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.shards = [torch.as_tensor(row[:c], dtype=torch.long)
                       for row, c in zip(indices, counts, strict=True)]
        self.variant, self.P, self.D = variant, num_workers, max_delay
        self.max_delay = max(max_delay, num_workers - 1) if variant.startswith("async") else (
            max_delay)
        self.b, self.eta = batch_size, learning_rate
        self.k = max(1, math.floor(fraction * self.d))
        self.compress = "topk" in variant
        self.ef = variant.endswith("_ef")
        self.round = 0
        self.residual = torch.zeros(self.P, self.d) if self.ef else None
        D = self.max_delay
        if variant.startswith("async"):
            self.history = collections.deque([self.x.clone() for _ in range(D + 1)],
                                             maxlen=D + 1)  # history[0] is the newest
            self.updates = 0
        if variant == "message_passing":
            self.views = self.x.repeat(self.P, 1)
            self.pending = collections.defaultdict(lambda: torch.zeros(self.P, self.d))
        if variant == "elastic_scheduling":
            self.outstanding = collections.deque()  # (eta gbar_s, arrival [P])
        if variant == "local_sgd":
            self.local = self.x.repeat(self.P, 1)
        self.losses, self.b_hat = [], []

    # ------------------------------------------------------------------ pieces

    def _batch(self, p):
        shard = self.shards[p]
        rows = shard[torch.randint(len(shard), (self.b,), generator=self.gen)]
        return self.images[rows], self.labels[rows]

    def _grad(self, view, p):
        v = view.detach().requires_grad_(True)
        params, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            params[name] = v[offset:offset + size].view(shape)
            offset += size
        xb, yb = self._batch(p)
        loss = F.cross_entropy(torch.func.functional_call(self.module, params, (xb,)), yb)
        (grad,) = torch.autograd.grad(loss, v)
        return loss.detach(), grad

    def _send(self, p, step):
        """The update worker `p` sends for `step = eta g`: Top-k, with error feedback."""
        if self.ef:
            step = self.residual[p] + step
        if self.compress:
            idx = torch.topk(step.abs(), self.k).indices
            sent = torch.zeros_like(step)
            sent[idx] = step[idx]
        else:
            sent = step
        if self.ef:
            self.residual[p] = step - sent
        return sent

    # ------------------------------------------------------------------ rounds

    def _sync_round(self):
        total, losses = torch.zeros(self.d), []
        for p in range(self.P):
            loss, g = self._grad(self.x, p)
            losses.append(loss)
            total += self._send(p, self.eta * g)
        aux_gap = self.residual.mean(0).norm() if self.ef else torch.zeros(())
        self.x -= total / self.P
        return losses, aux_gap

    def _async_round(self):
        D, inconsistent = self.max_delay, self.variant != "async_consistent"
        stacked = torch.stack(list(self.history)) if inconsistent else None
        views, losses = [], []
        for i in range(self.P):
            t = self.updates + i
            if inconsistent:
                lags = torch.randint(i, D + 1, (self.d,), generator=self.gen).clamp(max=t)
                view = stacked.gather(0, (lags - i).clamp(min=0)[None])[0]
            else:
                lag = min(int(torch.randint(i, D + 1, (), generator=self.gen)), t)
                view = self.history[max(lag - i, 0)]
            loss, g = self._grad(view, i)
            views.append((view, g))
            losses.append(loss)
        gaps = []
        for i, (view, g) in enumerate(views):
            aux = self.x - self.residual.sum(0) if self.ef else self.x
            gaps.append((aux - view).norm())
            self.x = self.x - self._send(i, self.eta * g)
            self.history.appendleft(self.x)
        self.updates += self.P
        return losses, torch.stack(gaps).max()

    def _message_passing_round(self):
        losses, updates = [], []
        for q in range(self.P):
            loss, g = self._grad(self.views[q], q)
            losses.append(loss)
            updates.append(self.eta * g / self.P)
        gaps = (self.views - self.x).norm(dim=1).max()
        for p, u in enumerate(updates):
            self.x -= u
            self.views[p] -= u  # its own message, at once
            delays = torch.randint(0, self.D + 1, (self.P,), generator=self.gen)
            for q in range(self.P):
                if q != p:
                    self.pending[self.round + 1 + int(delays[q])][q] += u
        arrived = self.pending.pop(self.round + 1, None)
        if arrived is not None:
            self.views -= arrived
        return losses, gaps

    def _elastic_round(self):
        losses, total, gaps = [], torch.zeros(self.d), []
        for q in range(self.P):
            view = self.x.clone()
            for avg, arrival in self.outstanding:
                if arrival[q] > self.round:
                    view += avg
            gaps.append((view - self.x).norm())
            loss, g = self._grad(view, q)
            losses.append(loss)
            total += g
        avg = self.eta * total / self.P
        self.x -= avg
        lags = torch.randint(0, self.D + 1, (self.P,), generator=self.gen)
        self.outstanding.append((avg, self.round + 1 + lags))
        while len(self.outstanding) > self.D + 1:
            self.outstanding.popleft()
        return losses, torch.stack(gaps).max()

    def _local_round(self):
        period = max(self.D, 1)
        if self.round % period == 0:
            self.local = self.x.repeat(self.P, 1)
        gaps = (self.local - self.x).norm(dim=1).max()
        losses, total = [], torch.zeros(self.d)
        for p in range(self.P):
            loss, g = self._grad(self.local[p], p)
            losses.append(loss)
            self.local[p] -= self.eta * g
            total += g
        self.x -= self.eta * total / self.P
        return losses, gaps

    def run(self, rounds: int):
        """Advances `rounds` rounds; returns the mean losses as a NumPy array."""
        step = {
            "sync": self._sync_round, "message_passing": self._message_passing_round,
            "elastic_scheduling": self._elastic_round, "local_sgd": self._local_round,
        }.get(self.variant.split("_topk")[0], None)
        if self.variant.startswith("async"):
            step = self._async_round
        out = []
        for _ in range(rounds):
            losses, gap = step()
            out.append(torch.stack(losses).mean())
            self.b_hat.append(gap / self.eta)
            self.round += 1
        return torch.stack(out).numpy()
