"""RPO: regularized preference optimisation, DPO plus an SFT term on the chosen response
(Liu, Lu, Zhang, Liu, Guo, Yang, Blanchet, Wang, "Provably Mitigating Overoptimization in RLHF:
Your SFT Loss is Implicitly an Adversarial Regularizer", NeurIPS 2024, arXiv 2405.16436).

    rlx train algo=rpo                                                 # summed NLL, coef eta*beta
    rlx train algo=rpo algo.nll_reduction=token_mean algo.eta=0.2      # the average-NLL variant

Not TRL's removed `rpo_alpha` (that cites another "RPO", arXiv 2404.19733, and pools the
cross-entropy over all chosen tokens of the batch). With h the DPO log-ratio difference
(rlx.algorithms.dpo) and summed response log-probs, the paper's objective is

    L_RPO = L_DPO + η·β·L_SFT,   L_DPO = −E log σ(β·h),   L_SFT = −E log π_θ(y_w|x)

(the max-min objective after DPO's reparameterisation, with π_base = the chosen responses; the
equation numbers of the PDF were not checked, so none are quoted). The two normalisations of the official code:

    nll_reduction=sum         nll_i = −log π_θ(y_w|x), summed over its tokens; coef η·β
                              (alignment-handbook rpo_trainer.py; the paper's main tables)
    nll_reduction=token_mean  nll_i = −log π_θ(y_w|x) / |y_w|; coef η alone
                              (OpenRLHF --nll_loss_coef; the paper's Appendix F)

per pair l_i = softplus(−β·h_i) + coef·nll_i, and the loss is the mean over pairs (a per-sequence
token mean, then a batch mean: not TRL's token-pooled mean).

Defaults: β = 0.1 and the LR/steps of DPO's recipe (conf/recipe/dpo_from_sft.yaml), so the
preference benchmark compares like with like; η = 0.005 with the summed NLL (the paper's
Zephyr recipes). For token_mean the authors' OpenRLHF script uses η = 0.2 (with β = 0.5).
Logged: rpo/nll (the mean NLL in the chosen reduction), rpo/logps_chosen (the mean summed
chosen log-prob, which RPO is meant to keep from falling), and the implicit-reward metrics.

Deviations: the paper's β (0.01 / 0.05 on Zephyr) is replaced by rlx's DPO β = 0.1 for the tiny
SFT base; the reference's log-probs are cached per pair as in rlx's DPO.
"""
from __future__ import annotations

from torch import Tensor

from rlx.algorithms._pairs import PairBatcher, policy_logps, reward_metrics
from rlx.algorithms.dpo import dpo_loss
from rlx.errors import RlxError

REDUCTIONS = ("sum", "token_mean")


def rpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, chosen_counts: Tensor, beta: float, eta: float,
             nll_reduction: str = "sum") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-pair losses [B], the per-pair NLL of the chosen response [B] (in the chosen
    reduction), and the chosen and rejected implicit rewards [B] (detached). Log-probs are summed."""
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                                        ref_chosen_logps, ref_rejected_logps, beta)
    if nll_reduction == "sum":
        nll, coef = -policy_chosen_logps, eta * beta  # the paper's weight: eta scales beta
    elif nll_reduction == "token_mean":
        nll, coef = -policy_chosen_logps / chosen_counts.clamp(min=1), eta  # OpenRLHF: no beta factor
    else:
        raise RlxError(f"unknown algo.nll_reduction={nll_reduction!r}; valid: {', '.join(REDUCTIONS)}")
    return losses + coef * nll, nll, chosen_rewards, rejected_rewards


class RPO:
    needs_trained_model = True

    def __init__(self, reference=None, beta: float = 0.1, eta: float = 0.005, nll_reduction: str = "sum",
                 max_length: int = 256):
        if nll_reduction not in REDUCTIONS:
            raise RlxError(f"unknown algo.nll_reduction={nll_reduction!r}; valid: {', '.join(REDUCTIONS)}")
        if beta <= 0:
            raise RlxError(f"algo.beta={beta} must be > 0")
        if eta < 0:
            raise RlxError(f"algo.eta={eta} must be >= 0")
        self.beta, self.eta, self.nll_reduction, self.max_length = beta, eta, nll_reduction, max_length
        self.pairs = PairBatcher(reference, max_length)

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {}  # the reference cache is recomputed on resume

    def load_state_dict(self, state: dict) -> None: ...

    def make_batch(self, examples: list[dict], state) -> dict:
        return self.pairs.make_batch(examples, state)

    def loss(self, batch: dict, state):
        chosen, rejected, chosen_counts, _ = policy_logps(state.model, batch)
        losses, nll, chosen_rewards, rejected_rewards = rpo_loss(
            chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], chosen_counts,
            self.beta, self.eta, self.nll_reduction)
        loss = losses.mean()
        return loss, {"train/loss": loss.detach(), "rpo/nll": nll.mean().item(),
                      "rpo/logps_chosen": chosen.mean().item(),
                      **reward_metrics("rpo", chosen_rewards, rejected_rewards)}
