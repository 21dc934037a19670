"""DPO: direct preference optimisation (Rafailov et al., 2023), with cDPO label smoothing, IPO and
the other pairwise losses of TRL 1.16's DPOTrainer (`algo.loss_type=`).

    rlx train algo=dpo data=reasoning_pairs
    rlx train algo=dpo data=reasoning_pairs algo.label_smoothing=0.1     # cDPO
    rlx train algo=dpo data=reasoning_pairs algo.loss_type=ipo algo.beta=0.5
    rlx train algo=dpo algo.loss_type=robust algo.label_smoothing=0.1
    rlx train algo=dpo algo.loss_type=exo_pair algo.label_smoothing=1e-3
    rlx train algo=dpo algo.loss_type=bco_pair algo.bco_running_mean=true
    rlx train algo=dpo algo.loss_type=discopop algo.discopop_tau=0.05

For a pair (prompt x, chosen y_c, rejected y_r), with log-probs log π(y|x) of the trained policy
and log π_ref(y|x) of a frozen reference, the log-ratios and their difference are

    r_c = log π(y_c|x) − log π_ref(y_c|x),   r_r = log π(y_r|x) − log π_ref(y_r|x),   h = r_c − r_r

and the per-pair losses (σ the logistic function, ε = algo.label_smoothing; equation numbers
where the paper's equation is the loss as written) are

    sigmoid   DPO (arXiv 2305.18290, eq. 7):            −log σ(βh)
              cDPO (label smoothing ε):                 −(1−ε)·log σ(βh) − ε·log σ(−βh)
    hinge     SLiC (arXiv 2305.10425), margin 1/β:      max(0, 1 − βh)
    ipo       IPO (arXiv 2310.12036, eq. 17):           (h − 1/(2β))²                       [per-token]
    robust    rDPO (arXiv 2403.00409):                 (−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1−2ε)
    exo_pair  EXO-pref (arXiv 2402.00856, eq. 16):      σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε)
    nca_pair  NCA (arXiv 2402.05369):                  −log σ(βr_c) − ½·log σ(−βr_c) − ½·log σ(−βr_r)
    bco_pair  BCO (arXiv 2404.04656):                  −log σ(βr_c − δ) − log σ(−(βr_r − δ))
    sppo_hard SPPO (arXiv 2405.00675, eq. 4.7, P∈{0,1}): (r_c − 1/(2β))² + (r_r + 1/(2β))²
    aot       AOT (arXiv 2406.05882, paired):           cDPO's loss on the k-th smallest policy margin
              log π(y_c)−log π(y_r) minus the k-th smallest reference margin, k over the batch
    aot_unpaired  AOT, unpaired:                        cDPO's loss on (k-th smallest r_c) − (k-th smallest r_r)
    apo_zero  APO (arXiv 2408.06266, eq. 7):            1 − σ(βr_c) + σ(βr_r)
    apo_down  APO (arXiv 2408.06266, eq. 8):            σ(βr_c) + 1 − σ(βh)
    discopop  DiscoPOP (arXiv 2406.08414, eq. 5), with z = βh and τ = algo.discopop_tau:
              (1 − σ(z/τ))·(−log σ(z)) + σ(z/τ)·exp(−z)
    sigmoid_norm  DPO on per-token averaged log-probs:  −log σ(βh)                         [per-token]

[per-token]: the log-probs of each response are divided by its token count before the loss;
every other loss sums them over the response tokens. The implicit rewards β·r of both sides are
logged (`dpo/*`).

Conventions, following TRL 1.16's DPOTrainer (`_compute_loss`), which tests/algorithms/
test_dpo_trl.py checks loss by loss to 1e-6:
* sums or per-token averages as marked above. IPO's averaging is TRL's choice, confirmed with
  the IPO authors (OpenRLHF's IPO sums instead). The logged rewards use the same (summed or
  averaged) log-probs as the loss; TRL logs summed ones for every loss type;
* label smoothing ε feeds sigmoid (cDPO), robust, exo_pair (which needs ε > 0; the EXO paper
  recommends 1e-3), aot and aot_unpaired; any other loss type with ε > 0 is an error;
* aot and aot_unpaired sort over the pairs of one micro-batch (TRL: one device's batch), so
  their loss depends on the micro-batch size, not only on each pair;
* the response is the completion plus EOS, the prompt is masked (`rlx.data.collate.lm_batch`),
  as in SFT;
* the loss is the mean over pairs: `num_targets` counts pairs, so gradient accumulation
  weights micro-batches by pairs.

Defaults: β = 0.1 and τ = 0.05 (TRL's and the DiscoPOP paper's), ε = 0.

Deviations:
* the reference is a second copy of the model built from the same config
  (`algo.reference='${model}'`, the default), and its log-probs are computed once per pair and
  cached in memory (TRL's `precompute_ref_log_probs`, but lazily): later epochs reuse them. The
  cache is not checkpointed; a resumed run recomputes it;
* TRL 1.16's sigmoid ignores label smoothing; rlx's applies it (cDPO, Mitchell 2023, the form
  that TRL keeps in aot for a one-pair batch and that OpenRLHF's `--model.label_smoothing` uses);
* bco_pair: the BCO paper shifts the rewards by δ, a running mean of the implicit rewards, and
  TRL's trainer used to (a `RunningMoments` of each batch's mean reward); TRL 1.16's bco_pair
  has δ = 0. The default follows TRL 1.16 (`algo.bco_running_mean=false`); with true, δ is the
  running average of the micro-batches' mean reward over (chosen, rejected), this one included,
  each micro-batch counting once as in TRL's `RunningMoments.update` of a scalar. δ is held by the
  DPO object and checkpointed (`state_dict`), so a resumed run continues it exactly. The paper's
  own δ is the evidence for true; TRL 1.16's removal of it, for false;
* not ported: TRL's `sft` term (that is RPO, rlx/algorithms/rpo.py), `loss_weights` mixtures,
  `f_divergence_type`, `ld_alpha`, WPO weighting and TR-DPO reference syncing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlx.algorithms._pairs import PairBatcher, policy_logps, reward_metrics
from rlx.errors import RlxError

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
PER_TOKEN = ("ipo", "sigmoid_norm")  # losses on per-token averaged log-probs (TRL's choice)
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")  # the losses label smoothing feeds


def _smoothed(z: Tensor, label_smoothing: float) -> Tensor:
    """cDPO's −(1−ε)·log σ(z) − ε·log σ(−z); logsigmoid is the stable form of log σ for large |z|."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, discopop_tau: float = 0.05,
             reward_shift: float | Tensor = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses [B] and the chosen and rejected implicit rewards [B] (detached).

    The log-probs are per sequence: summed, or per-token averaged for the PER_TOKEN losses (the
    caller's choice; see the module docstring). aot and aot_unpaired sort across the batch.
    `reward_shift` is bco_pair's δ (0 in TRL 1.16)."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    z, chosen_z, rejected_z = beta * h, beta * chosen_ratio, beta * rejected_ratio
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = _smoothed(z, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        # KL(softmax over {y_c, y_r} of the implicit rewards || (1−ε, ε)), expanded for two responses
        eps = torch.as_tensor(label_smoothing, dtype=z.dtype, device=z.device)
        losses = (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps))
                  + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps)))
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(chosen_z) - 0.5 * F.logsigmoid(-chosen_z) - 0.5 * F.logsigmoid(-rejected_z)
    elif loss_type == "robust":
        # unbiased under labels flipped with probability ε: the flipped term enters with a + sign
        losses = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
            1 - 2 * label_smoothing)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(chosen_z - reward_shift) - F.logsigmoid(-(rejected_z - reward_shift))
    elif loss_type == "sppo_hard":
        losses = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    elif loss_type == "aot":
        # sorted policy margins against sorted reference margins: a first-order stochastic dominance
        # of the policy's margin distribution over the reference's, pair order within the batch ignored
        policy_margins = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
        ref_margins = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
        losses = _smoothed(beta * (policy_margins - ref_margins), label_smoothing)
    elif loss_type == "aot_unpaired":
        delta = torch.sort(chosen_ratio, dim=0).values - torch.sort(rejected_ratio, dim=0).values
        losses = _smoothed(beta * delta, label_smoothing)
    elif loss_type == "apo_zero":  # chosen better than the model's own outputs: raise chosen, lower rejected
        losses = 1 - torch.sigmoid(chosen_z) + torch.sigmoid(rejected_z)
    elif loss_type == "apo_down":  # chosen worse than the model's own: lower chosen, rejected more
        losses = torch.sigmoid(chosen_z) + 1 - torch.sigmoid(z)
    elif loss_type == "discopop":
        # logistic loss for negative margins, exponential for positive ones, mixed by σ(z/τ)
        mix = torch.sigmoid(z / discopop_tau)
        losses = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
    else:
        raise RlxError(f"unknown algo.loss_type={loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    return losses, chosen_z.detach(), rejected_z.detach()


class DPO:
    needs_trained_model = True

    def __init__(self, reference=None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, max_length: int = 256, discopop_tau: float = 0.05,
                 bco_running_mean: bool = False):
        if loss_type not in LOSS_TYPES:
            raise RlxError(f"unknown algo.loss_type={loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if beta <= 0:
            raise RlxError(f"algo.beta={beta} must be > 0")
        if not 0.0 <= label_smoothing < 0.5:
            raise RlxError(f"algo.label_smoothing={label_smoothing} must be in [0, 0.5)")
        if label_smoothing > 0 and loss_type not in SMOOTHED:
            raise RlxError(f"algo.label_smoothing applies to loss_type={', '.join(SMOOTHED)} only, not {loss_type}")
        if loss_type == "exo_pair" and label_smoothing == 0:
            raise RlxError("loss_type=exo_pair needs algo.label_smoothing > 0 (log ε); the EXO paper uses 1e-3")
        if discopop_tau <= 0:
            raise RlxError(f"algo.discopop_tau={discopop_tau} must be > 0")
        if bco_running_mean and loss_type != "bco_pair":
            raise RlxError("algo.bco_running_mean applies to loss_type=bco_pair only")
        self.beta, self.loss_type, self.label_smoothing, self.max_length = beta, loss_type, label_smoothing, max_length
        self.discopop_tau, self.bco_running_mean = discopop_tau, bco_running_mean
        self.reward_mean, self.reward_updates = 0.0, 0  # bco_pair's δ: running mean of micro-batch mean rewards
        self.pairs = PairBatcher(reference, max_length)

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        # the reference cache is recomputed on resume; bco_pair's running δ is not recomputable
        return {"reward_mean": self.reward_mean, "reward_updates": self.reward_updates} if self.bco_running_mean else {}

    def load_state_dict(self, state: dict) -> None:
        if self.bco_running_mean:
            self.reward_mean, self.reward_updates = float(state["reward_mean"]), int(state["reward_updates"])

    def make_batch(self, examples: list[dict], state) -> dict:
        return self.pairs.make_batch(examples, state)

    def update_reward_mean(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> float:
        """Folds this micro-batch's mean reward into the running mean (one count per call, as TRL's
        `RunningMoments.update` of a scalar) and returns the new mean, this batch included."""
        self.reward_updates += 1
        batch_mean = torch.cat([chosen_rewards, rejected_rewards]).mean().item()
        self.reward_mean += (batch_mean - self.reward_mean) / self.reward_updates
        return self.reward_mean

    def loss(self, batch: dict, state):
        chosen, rejected, chosen_counts, rejected_counts = policy_logps(state.model, batch)
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.loss_type in PER_TOKEN:  # TRL: IPO and sigmoid_norm compare per-token averages, not sums
            chosen_counts, rejected_counts = chosen_counts.clamp(min=1), rejected_counts.clamp(min=1)
            chosen, ref_chosen = chosen / chosen_counts, ref_chosen / chosen_counts
            rejected, ref_rejected = rejected / rejected_counts, ref_rejected / rejected_counts
        shift, metrics = 0.0, {}
        if self.bco_running_mean:
            shift = self.update_reward_mean(self.beta * (chosen - ref_chosen).detach(),
                                            self.beta * (rejected - ref_rejected).detach())
            metrics["dpo/reward_shift"] = shift
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                                            self.loss_type, self.label_smoothing, self.discopop_tau,
                                                            shift)
        loss = losses.mean()
        return loss, {"train/loss": loss.detach(), **reward_metrics("dpo", chosen_rewards, rejected_rewards), **metrics}
