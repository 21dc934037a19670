"""Dynamic loss-based sample reweighting (`weighting=loss_based`): each micro-batch's samples are
weighted by where their loss lies between the batch's lowest and highest.

    rlx train algo=sft data=shakespeare weighting=loss_based                   # LinUpper, delta 1, r 1
    rlx train algo=sft data=shakespeare weighting=loss_based weighting.strategy=quadratic
    rlx train algo=sft data=shakespeare weighting=loss_based weighting.warmup=50 weighting.r=0.4

Paper: D. Sow, H. Woisetschläger, S. Bulusu, S. Wang, H.-A. Jacobsen, Y. Liang, "Dynamic Loss-Based
Sample Reweighting for Improved Large Language Model Pretraining", ICLR 2025, arXiv 2502.06733.
Code: github.com/sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025 (README and src/trainer.py, GPT-2
runs) and the `reweighted-train` branch of foundation-model-stack/fms-fsdp (LLaMA 1.4B/7B runs).

Per micro-batch of B samples with losses l_i (mean token cross-entropy of each sequence), fully
online (no history across steps):
    normalize   l~_i = 2 delta l_i / (l_max - l_min) - delta (l_max + l_min) / (l_max - l_min)  in [-delta, delta],
                the denominator guarded by max(l_max - l_min, 1e-6), so equal losses give l~ = 0;
    strategy    linupper   s_i = min(l~_i + delta, delta)   down-weights the easy (low-loss) half linearly,
                                                             flat above the midpoint: a bounded max weight
                                                             (the paper's recommended strategy);
                quadratic  s_i = 1 - l~_i^2 / delta^2      down-weights both extremes (the code's "mid");
                extremes   s_i = |l~_i|                    up-weights both extremes;
                uniform    s_i = l~_i                      the reference code's "uniform": NOT uniform weights
                                                             under the softmax, a linear up-weighting of high
                                                             losses (true uniform weights: weighting=none, or
                                                             this weighting during its warmup);
    weights     p_i = softmax(s_i / r) (the max subtracted first), r the temperature (the code's kl_reg:
                the weights solve max_p sum p_i s_i - r KL(p || uniform));
    loss        sum_i p_i l_i, the weights constants (no gradient through them).
rlx's SFT takes `(w * per_sample_loss).mean()`, so this returns w = B p: the mean is the paper's sum.
Equal losses (or r -> inf) give w = 1, i.e. the per-sample-mean loss.

Defaults: delta = 1 (every run of both code bases), r = 1 (the GPT-2 `ours_nodr` config and the
README; the larger GPT-2 configs use 0.4), warmup 0. Warmup: the GPT-2 trainer skips reweighting for
its first `burnout_steps` (1000 of 20,000) so that the losses mean something before they are used;
the LLaMA trainer instead holds r at 100 (near-uniform) for its first 2000 steps. `warmup=N` gives
uniform weights for the first N calls (the GPT-2 form); `warmup_r=100` uses that temperature instead
(the LLaMA form).

Deviations and scope:
  - The batch is rlx's micro-batch: rlx trains in one process, so there is no all-gather of the losses
    across ranks and no x world_size (the reference normalizes over the global batch of all GPUs; the
    same result on one rank). With grad_accum > 1 each micro-batch is normalized on its own, and
    `warmup` counts calls, i.e. micro-batches (= steps at grad_accum 1).
  - The GPT-2 trainer also multiplies by each sequence's share of the batch's target tokens; rlx's SFT
    with a weighting averages per-sample means, which is the same for equal-length pretraining chunks.
  - The GPT-2 code's "upper" strategy (s = l~/2 + delta/2, equivalent to `uniform` at temperature 2r)
    is not offered separately.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rlx.errors import RlxError
from rlx.weighting import weight_metrics

STRATEGIES = ("linupper", "quadratic", "extremes", "uniform")


# ---------------------------------------------------------------------------- the math


def normalize(losses: Tensor, delta: float = 1.0) -> Tensor:
    """The batch's losses mapped linearly onto [-delta, delta] by its min and max (eq. of l~ above)."""
    lo, hi = losses.min().item(), losses.max().item()
    span = max(hi - lo, 1e-6)  # equal losses: every l~ is 0, so the weights are uniform
    return 2.0 * delta * losses / span - delta * (hi + lo) / span


def score(normalized: Tensor, strategy: str, delta: float = 1.0) -> Tensor:
    """s_i, the strategy's shape of weight against normalized loss."""
    if strategy == "linupper":
        return torch.clamp(normalized + delta, max=delta)
    if strategy == "quadratic":
        return 1.0 - normalized**2 / delta**2
    if strategy == "extremes":
        return normalized.abs()
    if strategy == "uniform":
        return normalized
    raise RlxError(f"weighting.strategy={strategy}: choose one of {', '.join(STRATEGIES)}")


def softmax_weights(losses: Tensor, strategy: str = "linupper", delta: float = 1.0, r: float = 1.0) -> Tensor:
    """p = softmax(s / r) over the batch: the paper's weights, summing to 1."""
    s = score(normalize(losses.detach().double(), delta), strategy, delta)
    return torch.softmax((s - s.max()) / r, dim=0).to(losses.dtype)


# ---------------------------------------------------------------------------- the weighting


class LossBased:
    """`weighting=loss_based`: w = B softmax(s(l~) / r) per micro-batch (see the module docstring)."""

    def __init__(self, strategy: str = "linupper", delta: float = 1.0, r: float = 1.0, warmup: int = 0,
                 warmup_r: float | None = None):
        if strategy not in STRATEGIES:
            raise RlxError(f"weighting.strategy={strategy}: choose one of {', '.join(STRATEGIES)}")
        if not delta > 0:
            raise RlxError(f"weighting.delta={delta}: the normalized losses span [-delta, delta], so delta must be > 0")
        for name, value in (("r", r), ("warmup_r", warmup_r)):
            if value is not None and not value > 0:
                raise RlxError(f"weighting.{name}={value}: a softmax temperature must be > 0")
        if warmup < 0:
            raise RlxError(f"weighting.warmup={warmup}: the number of uniformly weighted calls must be >= 0")
        self.strategy, self.delta, self.r = strategy, float(delta), float(r)
        self.warmup, self.warmup_r = int(warmup), warmup_r
        self.calls = 0  # micro-batches weighed so far: where the warmup ends
        self.metrics: dict[str, float] = {}

    def temperature(self) -> float | None:
        """This call's r; None while the warmup gives uniform weights."""
        if self.calls < self.warmup:
            return None if self.warmup_r is None else float(self.warmup_r)
        return self.r

    def __call__(self, losses: Tensor, ids: list | None) -> Tensor:
        losses = losses.detach()
        r = self.temperature()
        self.calls += 1
        if r is None:
            p = torch.full_like(losses, 1.0 / len(losses))
        else:
            p = softmax_weights(losses, self.strategy, self.delta, r)
        w = len(losses) * p
        self.metrics = {**weight_metrics(w), **self.spread(p)}
        return w

    @staticmethod
    def spread(p: Tensor) -> dict[str, float]:
        """The weights' entropy relative to uniform's (1: uniform; 0: one sample takes all)."""
        n = len(p)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum().item()
        return {"weight/entropy": entropy / math.log(n) if n > 1 else 1.0}

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
