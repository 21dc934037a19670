"""CLASSP: continual learning through adjustment suppression and sparsity promotion.

    rlx train optimizer=classp
    rlx train optimizer=classp optimizer.threshold=1e-8 optimizer.p=2

O. Ludwig, arXiv 2405.09637 (2024). Per weight w_i, with gradient g_{i,t} at step t:

    if g_{i,t}² > threshold:   w_i ← w_i − α g_{i,t} / (ε + Σ_k |g_{i,k}|^p)^{1/p}
    else:                      w_i unchanged

Two mechanisms, both modelled on long-term potentiation: the denominator suppresses further
adjustment of weights that have already moved a lot (they likely encode earlier tasks; p = 2
is AdaGrad), and the threshold leaves weights with a small gradient untouched, so updates stay
sparse and free weights remain for later tasks. One accumulator per weight.

What the paper fixes: the update above, ε inside the p-th root, the threshold on the squared
gradient, per weight, and no update below it. The author's experiment scripts (github.com/
oswaldoludwig/CLASSP) use p = 1 throughout; p = 2 with threshold 0 (AdaGrad) is an ablation.

What rlx chooses:
- `include_current` (default true): whether the sum runs over the current gradient too. The
  paper's formula sums k = 0 … t−1 (past gradients only), which makes the first step divide
  by ε^{1/p}; the author's reference implementation adds |g_t| before dividing, as AdaGrad
  does, and so does rlx's default. False needs ε > 0.
- `accumulate` (default `updated`): which gradients enter the sum. `updated`: only those that
  cleared the threshold, i.e. the sum counts the adjustments a weight actually received
  (potentiated synapses). `all`: every gradient, as the formula reads literally.
- Defaults: p = 1 and ε = 1e-5 as in the reference implementation; lr = 1e-3 and threshold = 0
  are rlx's. The reference runs use α = 0.2 (MNIST → Fashion-MNIST) and α = 0.025 (Financial
  PhraseBank → IMDB) with thresholds 0.5 and 0.99, but that code compares the threshold with one
  flag per tensor ("some gradient is nonzero"), not with each g², so those values say nothing
  about a per-weight threshold. Its useful range depends on the model's gradient scale (small
  under clipping): set it from the distribution of g², e.g. a low quantile.
- With p = 1 and the current gradient included, the first step of every weight is
  α·g/(ε + |g|) ≈ α·sign(g): like Lion, the LR is a step size per weight, not a gradient scale.
"""
from __future__ import annotations

from typing import Iterable

import torch

ACCUMULATE = ("updated", "all")


class CLASSP(torch.optim.Optimizer):
    """CLASSP (module docstring): state is one accumulator `sum` = Σ|g|^p per weight."""

    def __init__(self, params: Iterable, lr: float = 1e-3, p: float = 1.0, eps: float = 1e-5,
                 threshold: float = 0.0, include_current: bool = True, accumulate: str = "updated"):
        if accumulate not in ACCUMULATE:
            raise ValueError(f"unknown CLASSP accumulate={accumulate!r}; valid: {', '.join(ACCUMULATE)}")
        if lr < 0 or p <= 0 or eps < 0 or threshold < 0:
            raise ValueError(f"CLASSP needs lr >= 0, p > 0, eps >= 0, threshold >= 0; got {lr}, {p}, {eps}, {threshold}")
        if not include_current and eps <= 0:
            raise ValueError("CLASSP with include_current=false divides the first step by eps^(1/p): eps must be > 0")
        super().__init__(params, dict(lr=lr, p=p, eps=eps, threshold=threshold,
                                      include_current=include_current, accumulate=accumulate))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, power, eps = group["lr"], group["p"], group["eps"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                if w.grad.is_sparse:
                    raise RuntimeError("CLASSP does not support sparse gradients")
                g = w.grad
                state = self.state[w]
                if not state:
                    state["sum"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                acc = state["sum"]
                gate = g * g > group["threshold"]
                added = g.abs().pow(power)
                if group["accumulate"] == "updated":
                    added = added * gate
                if group["include_current"]:
                    acc.add_(added)
                denom = (acc + eps).pow(1 / power)
                if not group["include_current"]:
                    acc.add_(added)
                # where() and not g·gate/denom: a gated-off weight whose denominator is 0 stays put
                w.sub_(torch.where(gate, g / denom, 0.0), alpha=lr)
        return loss
