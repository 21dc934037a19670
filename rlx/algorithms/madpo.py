"""MADPO: margin-adaptive DPO, each pair's DPO loss weighted by a frozen reward model's margin
(Hyung Gyu Rho, "Margin Adaptive DPO: Leveraging Reward Model for Granular Control in
Preference Optimization", arXiv 2510.05342).

    rlx train algo=rm                                                    # stage 1: the reward model
    rlx train algo=madpo algo.reward_model.checkpoint=outputs/<date>/<time>/checkpoints/last
    rlx train algo=madpo algo.reward_model.checkpoint=... algo.weight=none   # w = 1: DPO

Stage 1 is a Bradley-Terry reward model r_φ on the same pairs (`algo=rm`). Stage 2, with its
frozen margin h = r_φ(x, y_w) − r_φ(x, y_l) and the DPO log-ratio difference h_θ (summed
log-probs, rlx.algorithms.dpo):

    L_MADPO = E[ −w(h) · log σ(β·h_θ) ]
    c(|h|)  = c_min + (c_max − c_min) / (1 + ((c_max − 1)/(1 − c_min)) · exp(λ·(|h| − τ)))
    w(h)    = σ(c(|h|)·h) / σ(h)   if h > −τ,   1 otherwise (the cap on strongly mislabelled pairs)

so c(τ) = 1, c(0) ≈ c_max, c(∞) → c_min, w(0) = 1: small positive margins (hard pairs) are
amplified, pairs the RM mildly disagrees with are damped, large margins get w slightly below 1.
The equations follow the official code (sirano1004/Margin-Apative-Direct-Preference-Optimization,
utils/loss_functions.py::MADPOLoss, which the v1 paper describes); the PDF's equation numbers
were not checked, so none are quoted.

Defaults (the official IMDB notebook): β = 0.1, c_max = 2, c_min = 0.5 (1/c_max), λ = 1,
τ = ln(0.999/0.001) = ln 999 ≈ 6.9068 (the margin where the BT win probability is 0.999).
LR and steps come from DPO's recipe (conf/recipe/dpo_from_sft.yaml).
Logged: madpo/weight_mean, madpo/rm_margin_mean and the implicit-reward metrics.

Deviations: the weights are computed from the RM at first sight of a pair and cached (the
official code precomputes them as a dataset column: the same, as the RM is frozen); the
reward model is rlx's `algo=rm` model (a causal LM scoring EOS), not the paper's Gemma+LoRA
classifier; `weight=none` (w = 1, DPO exactly) is rlx's switch for the limit.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rlx.algorithms._pairs import PairBatcher, RewardMargins, policy_logps, reward_metrics
from rlx.algorithms.dpo import dpo_loss
from rlx.errors import RlxError

WEIGHTS = ("margin", "none")


def margin_scale(abs_margin: Tensor, c_max: float = 2.0, c_min: float = 0.5, lam: float = 1.0,
                 tau: float = math.log(999)) -> Tensor:
    """c(|h|): a logistic from ≈ c_max at 0 through 1 at τ down to c_min (needs c_min < 1 < c_max)."""
    ratio = (c_max - 1) / (1 - c_min)  # chosen so that c(τ) = 1 exactly
    return c_min + (c_max - c_min) / (1 + ratio * torch.exp(lam * (abs_margin - tau)))


def margin_weight(margin: Tensor, c_max: float = 2.0, c_min: float = 0.5, lam: float = 1.0,
                  tau: float = math.log(999)) -> Tensor:
    """w(h) = σ(c(|h|)·h)/σ(h) for h > −τ, else 1; computed as exp(logσ(c·h) − logσ(h)) for stability."""
    c = margin_scale(margin.abs(), c_max, c_min, lam, tau)
    w = torch.exp(torch.nn.functional.logsigmoid(c * margin) - torch.nn.functional.logsigmoid(margin))
    return torch.where(margin > -tau, w, torch.ones_like(w))  # without the cap w grows like exp((1-c)|h|)


class MADPO:
    needs_trained_model = True

    def __init__(self, reference=None, reward_model=None, beta: float = 0.1, c_max: float = 2.0,
                 c_min: float = 0.5, lam: float = 1.0, tau: float = math.log(999), weight: str = "margin",
                 max_length: int = 256):
        if weight not in WEIGHTS:
            raise RlxError(f"unknown algo.weight={weight!r}; valid: {', '.join(WEIGHTS)}")
        if beta <= 0:
            raise RlxError(f"algo.beta={beta} must be > 0")
        if weight == "margin" and not c_min < 1 < c_max:
            raise RlxError(f"algo.c_min={c_min} and algo.c_max={c_max} must satisfy c_min < 1 < c_max "
                           "(for w = 1 use algo.weight=none)")
        if tau <= 0 or lam <= 0:
            raise RlxError(f"algo.tau={tau} and algo.lam={lam} must be > 0")
        self.beta, self.weight, self.max_length = beta, weight, max_length
        self.c_max, self.c_min, self.lam, self.tau = c_max, c_min, lam, tau
        self.pairs = PairBatcher(reference, max_length)
        self.margins = RewardMargins(reward_model)

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {}  # the reference and RM caches are recomputed on resume

    def load_state_dict(self, state: dict) -> None: ...

    def make_batch(self, examples: list[dict], state) -> dict:
        batch = self.pairs.make_batch(examples, state)
        batch["rm_margins"] = self.margins(examples).to(state.model.device)
        return batch

    def loss(self, batch: dict, state):
        chosen, rejected, _, _ = policy_logps(state.model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, batch["ref_chosen_logps"],
                                                            batch["ref_rejected_logps"], self.beta)
        margins = batch["rm_margins"]
        if self.weight == "none":
            w = torch.ones_like(margins)
        else:
            w = margin_weight(margins, self.c_max, self.c_min, self.lam, self.tau)
        loss = (w * losses).mean()  # w is a constant of the frozen RM: no gradient through it
        return loss, {"train/loss": loss.detach(), "madpo/weight_mean": w.mean().item(),
                      "madpo/rm_margin_mean": margins.mean().item(),
                      **reward_metrics("madpo", chosen_rewards, rejected_rewards)}
