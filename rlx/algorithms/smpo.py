"""SmPO for LLMs: smoothed-label DPO, each pair's DPO logit rescaled by a reward model's
preference probability (Lu, Wang, Cao, Xu, Zhang, "Smoothed Preference Optimization via ReNoise
Inversion for Aligning Diffusion Models with Varied Human Preferences", ICML 2025, arXiv 2506.02698).

    rlx train algo=rm                                                    # the reward model first
    rlx train algo=smpo algo.reward_model.checkpoint=outputs/<date>/<time>/checkpoints/last
    rlx train algo=smpo algo.reward_model.checkpoint=... algo.k=10       # the paper code's gain

The paper replaces the binary preference with a smoothed one: each side's target density is a
geometric mixture p~(y_w|x) ∝ p(y_w|x)^α · p(y_l|x)^(γ−α) (and symmetrically for y_l). Put into
DPO's derivation the normalisers cancel and, with h_θ the DPO log-ratio difference (summed
log-probs, rlx.algorithms.dpo), the loss is

    L_SmPO = −E log σ( (2α − γ) · β · h_θ )

α = γ = 1 is DPO; α = 1/2, γ = 1 (a tie) is the constant log 2 with zero gradient. α comes from a
reward model, not from annotators. The LLM form here (the paper note's "smoothed-label DPO"):

    α = σ(Δr / τ_rm),  Δr = r(x, y_w) − r(x, y_l) of a frozen `algo=rm` model
    l = softplus( −k · (2α − γ) · β · h_θ )

With a Bradley-Terry RM and τ_rm = 1, α is the RM's own win probability. It is a per-pair β,
β_i = k(2α_i − γ)β, close to MADPO in spirit (MADPO reweights the loss, SmPO rescales the logit),
and not cDPO's label smoothing: cDPO mixes the two directions with a constant ε, so its optimum
for a pair is a finite margin (probability 1 − ε), while SmPO's near-tie has no pull at all.

Defaults: β = 0.1 and DPO's recipe (conf/recipe/dpo_from_sft.yaml); γ = 1 (hard-coded in the
official code); k = 1 (the official diffusion code multiplies by 10 to make up for its tiny
min-max-normalised PickScore gaps; an LLM RM with τ_rm = 1 has gaps of order 1); τ_rm = 1.
`relabel`: the paper relabels every pair by its RM (the higher score wins, so α ≥ 1/2); rlx
keeps the data's label by default and lets α < 1/2 reverse the push, because here the labels are
correct by construction (rlx.data.preferences) and the RM is trained on those same labels. With
γ = 1 the two are the same loss (2σ(−z) − 1 = −(2σ(z) − 1) and the swap flips h_θ); they differ
only for γ ≠ 1. The logged implicit rewards always follow the data's label.
Logged: smpo/alpha_mean, smpo/scale_mean (the mean of k(2α − γ)), and the implicit-reward metrics.

Deviations: ReNoise inversion, the diffusion half of the paper (estimating a diffusion
trajectory by DDIM inversion), has no LLM analogue (sequence log-probs are exact) and is left
out; α is σ(Δr/τ_rm) from rlx's reward model rather than the paper's softmax of min-max
normalised PickScores (τ_rm stands in for that normalisation); the RM margins are cached per
pair. The PDF's equation numbers were not checked, so none are quoted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlx.algorithms._pairs import PairBatcher, RewardMargins, policy_logps, reward_metrics
from rlx.errors import RlxError


def smoothed_alpha(reward_margins: Tensor, tau_rm: float = 1.0) -> Tensor:
    """α = σ(Δr/τ_rm): the RM's probability that the labelled chosen response is the better one."""
    return torch.sigmoid(reward_margins / tau_rm)


def smpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, alpha: Tensor, beta: float, gamma: float = 1.0,
              k: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses [B] and the chosen and rejected implicit rewards β·log-ratio [B] (detached)."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    pair_beta = k * (2 * alpha - gamma) * beta  # the per-pair temperature; no gradient (alpha is the RM's)
    losses = -F.logsigmoid(pair_beta * h)  # = softplus(-pair_beta * h), in DPO's own form
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class SmPO:
    needs_trained_model = True

    def __init__(self, reference=None, reward_model=None, beta: float = 0.1, gamma: float = 1.0, k: float = 1.0,
                 tau_rm: float = 1.0, relabel: bool = False, max_length: int = 256):
        if beta <= 0 or k <= 0 or tau_rm <= 0:
            raise RlxError(f"algo.beta={beta}, algo.k={k} and algo.tau_rm={tau_rm} must be > 0")
        if not 0 < gamma <= 2:
            raise RlxError(f"algo.gamma={gamma} must be in (0, 2] (2*alpha - gamma spans [-gamma, 2 - gamma])")
        self.beta, self.gamma, self.k, self.tau_rm, self.relabel = beta, gamma, k, tau_rm, relabel
        self.max_length = max_length
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
        ref_chosen, ref_rejected, margins = batch["ref_chosen_logps"], batch["ref_rejected_logps"], batch["rm_margins"]
        _, chosen_rewards, rejected_rewards = smpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                        torch.ones_like(margins), self.beta)  # the data's label
        if self.relabel:  # the paper: the RM's preferred response is the winner, so delta_r >= 0
            swap = margins < 0
            chosen, rejected = torch.where(swap, rejected, chosen), torch.where(swap, chosen, rejected)
            ref_chosen, ref_rejected = torch.where(swap, ref_rejected, ref_chosen), torch.where(swap, ref_chosen,
                                                                                                ref_rejected)
            margins = margins.abs()
        alpha = smoothed_alpha(margins, self.tau_rm)
        losses, _, _ = smpo_loss(chosen, rejected, ref_chosen, ref_rejected, alpha, self.beta, self.gamma, self.k)
        loss = losses.mean()
        return loss, {"train/loss": loss.detach(), "smpo/alpha_mean": alpha.mean().item(),
                      "smpo/scale_mean": (self.k * (2 * alpha - self.gamma)).mean().item(),
                      **reward_metrics("smpo", chosen_rewards, rejected_rewards)}
