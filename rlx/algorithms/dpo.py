"""DPO: direct preference optimisation (Rafailov et al., 2023), with cDPO label smoothing and IPO.

    rlx train algo=dpo data=reasoning_pairs
    rlx train algo=dpo data=reasoning_pairs algo.label_smoothing=0.1     # cDPO
    rlx train algo=dpo data=reasoning_pairs algo.loss_type=ipo algo.beta=0.5

For a pair (prompt x, chosen y_c, rejected y_r), with log-probs log π(y|x) of the trained policy
and log π_ref(y|x) of a frozen reference, the log-ratio difference is

    h = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))

and the per-pair losses are

    sigmoid (DPO, eq. 7):     −log σ(β·h)
    cDPO (label smoothing ε): −(1−ε)·log σ(β·h) − ε·log σ(−β·h)
    ipo (Azar et al., 2023):  (h − 1/(2β))²

The implicit rewards β·(log π(y|x) − log π_ref(y|x)) of both sides are logged (`dpo/*`).

Conventions, following TRL's DPOTrainer:
* sigmoid sums the log-probs over the response tokens; IPO averages them per token
  (TRL's choice, confirmed with the IPO authors; OpenRLHF's IPO sums instead). The logged
  rewards use the same (summed or averaged) log-probs as the loss;
* the response is the completion plus EOS, the prompt is masked (`rlx.data.collate.lm_batch`),
  as in SFT;
* the loss is the mean over pairs: `num_targets` counts pairs, so gradient accumulation
  weights micro-batches by pairs.

Deviation: the reference is a second copy of the model built from the same config
(`algo.reference='${model}'`, the default), and its log-probs are computed once per pair and
cached in memory (TRL's `precompute_ref_log_probs`, but lazily): later epochs reuse them. The
cache is not checkpointed; a resumed run recomputes it.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rlx.algorithms._pairs import PairBatcher, policy_logps, reward_metrics
from rlx.errors import RlxError

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses [B] and the chosen and rejected implicit rewards [B] (detached).

    The log-probs are per sequence: summed for sigmoid, per-token averaged for IPO (the caller's
    choice; see the module docstring)."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        # logsigmoid is the stable form of log(σ(x)) for large |x|
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise RlxError(f"unknown algo.loss_type={loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPO:
    needs_trained_model = True

    def __init__(self, reference=None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, max_length: int = 256):
        if reference is None:
            raise RlxError("DPO needs a frozen reference model: set algo.reference='${model}' (conf/algo/dpo.yaml does)")
        if loss_type not in LOSS_TYPES:
            raise RlxError(f"unknown algo.loss_type={loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if beta <= 0:
            raise RlxError(f"algo.beta={beta} must be > 0")
        if not 0.0 <= label_smoothing < 0.5:
            raise RlxError(f"algo.label_smoothing={label_smoothing} must be in [0, 0.5)")
        if label_smoothing > 0 and loss_type != "sigmoid":
            raise RlxError("algo.label_smoothing (cDPO) applies to loss_type=sigmoid only")
        self.beta, self.loss_type, self.label_smoothing, self.max_length = beta, loss_type, label_smoothing, max_length
        self.pairs = PairBatcher(reference, max_length)

    def param_groups(self) -> list[dict]:
        return []  # the policy only

    def state_dict(self) -> dict:
        return {}  # the reference cache is recomputed on resume

    def load_state_dict(self, state: dict) -> None: ...

    def make_batch(self, examples: list[dict], state) -> dict:
        return self.pairs.make_batch(examples, state)

    def loss(self, batch: dict, state):
        chosen, rejected, chosen_counts, rejected_counts = policy_logps(state.model, batch)
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.loss_type == "ipo":  # TRL: IPO compares per-token averages, not sums
            chosen_counts, rejected_counts = chosen_counts.clamp(min=1), rejected_counts.clamp(min=1)
            chosen, ref_chosen = chosen / chosen_counts, ref_chosen / chosen_counts
            rejected, ref_rejected = rejected / rejected_counts, ref_rejected / rejected_counts
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                                            self.loss_type, self.label_smoothing)
        loss = losses.mean()
        return loss, {"train/loss": loss.detach(), **reward_metrics("dpo", chosen_rewards, rejected_rewards)}
